"""A PROXY of the trained demo model's embeddings, scaled to a city and to D = 2,048.

The model (fitted by `fit`, stored in benchmarks/results/demo_embedding_model.json):
- image vectors of a location: its 4 views concatenated (4 x 64 for the demo's D = 64) drawn
  from a K-component Gaussian mixture with one shared full covariance ("tied": k-means, then
  per-cluster means and the pooled within-cluster covariance, stored as its Cholesky factor)
  fitted to the demo model's image vectors of the demo's training split. The first fit used
  per-cluster diagonal covariances (a model without `chol`, still drawn from): it spread
  pairwise cosines and nearest-neighbour similarities too little (benchmarks/RESULTS.md);
- each view lifted to D dims by a fixed random orthonormal map (seeded), plus an isotropic
  part with a fraction `iso` of the energy (what a 64-dim model cannot show of a 2,048-dim
  one: an assumption, not a measurement), then L2-normalised as the model does;
- a text query of location n: per view t = norm * unit(c * i + sqrt(1 - c^2) * w), w a random
  unit direction built like an image view, where c (mean cosine of a description's vector
  with its own image view) and `norm` (mean text-vector length) are measured on the demo.
It is not the paper model's distribution: recall and speed on real embeddings may differ.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

V = 4


def _kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for c in range(k):
            if bool((assign == c).any()):
                centres[c] = x[assign == c].mean(0)
    return torch.cdist(x, centres).argmin(1)


def fit(images: torch.Tensor, texts: torch.Tensor, components: int = 8) -> dict:
    """Mixture of the (n, V, d) image vectors, and the text model, of one split of the demo."""
    x = images.reshape(images.shape[0], -1).double()  # (n, V*d)
    assign = _kmeans(x, components)
    weights, means, resid = [], [], []
    for c in range(components):
        part = x[assign == c]
        if part.shape[0] < 2:
            continue
        weights.append(part.shape[0] / x.shape[0])
        means.append(part.mean(0))
        resid.append(part - part.mean(0))
    r = torch.cat(resid)  # (n', V*d) within-cluster residuals
    cov = r.T @ r / (r.shape[0] - len(means)) + 1e-6 * torch.eye(r.shape[1], dtype=r.dtype)  # pooled ("tied")
    chol = torch.linalg.cholesky(cov)
    cos = torch.nn.functional.cosine_similarity(texts.double(), images.double(), dim=-1)  # (n, V)
    return {"views": images.shape[1], "dim": images.shape[2], "weights": weights,
            "means": [[round(v, 6) for v in m.tolist()] for m in means],
            "chol": [[round(v, 6) for v in row[: i + 1]] for i, row in enumerate(chol.tolist())],  # lower triangle
            "text_cos": float(cos.mean()), "text_norm": float(texts.double().norm(dim=-1).mean()),
            "fitted_on": int(images.shape[0])}


class Proxy:
    """Draws image vectors and text queries of the fitted model at dimension `dim`."""

    def __init__(self, model: dict, dim: int = 2048, iso: float = 0.1, seed: int = 0):
        self.m, self.dim, self.iso = model, dim, iso
        g = torch.Generator().manual_seed(seed)
        small = model["dim"]
        self.lift = [torch.linalg.qr(torch.randn(dim, small, generator=g))[0].T.contiguous() for _ in range(V)]  # (d, D)
        self.weights = torch.tensor(model["weights"])
        self.means = torch.tensor(model["means"], dtype=torch.float32).view(-1, V, small)
        self.chol = None
        if "chol" in model:  # tied full covariance (lower triangle stored row by row)
            rows = [r + [0.0] * (V * small - len(r)) for r in model["chol"]]
            self.chol = torch.tensor(rows, dtype=torch.float32)  # (V*d, V*d)
        else:  # the first fit: per-component diagonal
            self.stds = torch.tensor(model["stds"], dtype=torch.float32).view(-1, V, small)

    def _views(self, small: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, V, d) low-dim vectors -> (B, V, D) unit views: lifted part plus isotropic part."""
        scale = math.sqrt(1 - self.iso) / small.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # lift is orthonormal
        out = torch.randn(small.shape[0], V, self.dim, generator=g)  # (B, V, D) isotropic part
        out *= math.sqrt(self.iso) / out.norm(dim=-1, keepdim=True)
        for v in range(V):
            out[:, v].addmm_(small[:, v] * scale[:, v], self.lift[v])
        return out.div_(out.norm(dim=-1, keepdim=True))

    def images(self, n: int, g: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, V * self.means.shape[-1], generator=g)
        if self.chol is None:
            noise = self.stds[comp] * z.view(n, V, -1)
        else:
            noise = (z @ self.chol.T).view(n, V, -1)  # (n, V, d)
        return self._views(self.means[comp] + noise, g)

    def texts(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, V, D) text vectors describing the given image vectors."""
        c = self.m["text_cos"]
        w = self._views(torch.randn(images.shape[0], V, self.means.shape[-1], generator=g), g)
        w = torch.nn.functional.normalize(w - (w * images).sum(-1, keepdim=True) * images, dim=-1)  # orthogonal to i
        return self.m["text_norm"] * (c * images + math.sqrt(1 - c * c) * w)


def write_part_streamed(file: Path, n: int, dim: int, chunks, metadata: dict) -> None:
    """A safetensors index part written chunk by chunk (embeddings F16 (n, V, dim), all views
    present, coords F64, index I64): `chunks` yields (B, V, dim) tensors adding up to n rows."""
    layout = [("embeddings", "F16", [n, V, dim], 2 * V * dim * n), ("view_mask", "BOOL", [n, V], V * n),
              ("coords", "F64", [n, 3], 24 * n), ("index", "I64", [n], 8 * n)]
    header, start = {"__metadata__": metadata}, 0
    for name, dtype, shape, size in layout:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        start += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    tmp = file.with_name(f".tmp-{file.name}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        written = 0
        for block in chunks:
            f.write(block.to(torch.float16).numpy().tobytes())
            written += block.shape[0]
        assert written == n, (written, n)
        f.write(np.ones((n, V), dtype=np.bool_).tobytes())
        rng = np.random.default_rng(0)
        f.write((rng.standard_normal((n, 3)) * 1e3 + np.array([4.2e6, 1.7e5, 4.7e6])).tobytes())  # ECEF-like, unused
        f.write(np.arange(n, dtype=np.int64).tobytes())
    tmp.replace(file)


def describe(images: torch.Tensor, texts: torch.Tensor) -> dict:
    """What the fit is checked on (n locations, (n, V, d) both): spread of pairwise cosines
    (per view; concatenations) and nearest-neighbour similarity of the image vectors, and how
    far the best other locations' text scores stand above the rest."""
    x = torch.nn.functional.normalize(images.double(), dim=-1)  # (n, V, d)
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    per_view = torch.einsum("avd,bvd->vab", x, x)[:, off]  # (V, n*(n-1))
    cat = x.reshape(n, -1) / math.sqrt(x.shape[1])
    cc = (cat @ cat.T).masked_fill(~off, -9.0)
    nearest = cc.sort(1, descending=True).values  # (n, n) best other location first
    s = torch.einsum("qvd,bvd->qb", texts.double(), x).masked_fill(~off, float("-inf"))
    top = s.sort(1, descending=True).values[:, :50]
    return {"view_cos_mean": float(per_view.mean()), "view_cos_std": float(per_view.std()),
            "cat_cos_mean": float(cc[off].mean()), "cat_cos_std": float(cc[off].std()),
            "nn1_cos": float(nearest[:, 0].mean()), "nn10_cos": float(nearest[:, 9].mean()),
            "text_gap_1_10_in_std": float(((top[:, 0] - top[:, 9]) / top.std(1)).mean())}


def compare(demo_index: Path, demo_queries: Path, models: list[Path], dim: int = 2048, seed: int = 3) -> list[dict]:
    """`describe` of the demo's own vectors and of each fitted model's proxy, as many locations."""
    from safetensors.torch import load_file

    images = load_file(str(demo_index))["embeddings"]
    texts = load_file(str(demo_queries))["embeddings"]
    rows = [{"what": "demo", **describe(images, texts)}]
    for file in models:
        proxy, g = Proxy(json.loads(Path(file).read_text()), dim=dim), torch.Generator().manual_seed(seed)
        drawn = proxy.images(images.shape[0], g)
        rows.append({"what": Path(file).stem, **describe(drawn, proxy.texts(drawn, g))})
    return rows


if __name__ == "__main__":  # python benchmarks/proxy_embeddings.py DEMO_PART DEMO_QUERIES MODEL.json...
    import sys

    for row in compare(Path(sys.argv[1]), Path(sys.argv[2]), [Path(a) for a in sys.argv[3:]]):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
