"""Approximate index: a compressed FAISS graph (HNSW) or inverted file over each location's
concatenated views, beside the exact parts it re-ranks from (docs/retrieval.md#approximate-index).

One `approx-XXXXX.faiss` per exact part (the rank that wrote the part builds it): a linear
projection of the (V*D) concatenation to `coarse_dim` (top singular vectors of a training
sample, uncentred so inner products are kept), then an inner-product HNSW graph over 8-bit
scalar codes (`kind="hnsw"`, default) or an inverted file (`kind="ivf"`) with 8-bit scalar
or product codes (optionally OPQ). The header's `approximate` section records the
parameters, the search breadth (IVF: lists probed; HNSW: efSearch; both called `nprobe`)
chosen by `approx_tune.tune_nprobe`, the
recall it measured, and each file's sha256 (written by `approx_build.build_approximate`):
a file is read into memory, its checksum compared, and only then deserialised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from text4vpr.retrieval.index import HEADER, RetrievalIndexError, read_header
from text4vpr.retrieval.part_rows import PartRows
from text4vpr.utils.atomic import atomic_write_bytes, atomic_write_json
from text4vpr.utils.errors import InputValueError
from text4vpr.utils.hashing import bytes_sha256

SECTION = "approximate"
_MIN_PER_LIST = 39  # faiss's k-means warns below 39 training points per centroid


@dataclass
class ApproxConfig:
    """Approximate-index parameters; 0 = from the rule (docs/retrieval.md#approximate-index)."""

    kind: str = "hnsw"  # "hnsw": graph over sq8 codes; "ivf": inverted lists (sq8 or pq codes)
    hnsw_m: int = 32  # graph neighbours per node (2*hnsw_m on the bottom layer: 8*hnsw_m bytes per location)
    ef_construction: int = 128  # candidates kept while inserting (FAISS's default 40 builds a poorer graph)
    coarse_dim: int = 256  # projection of the V*D concatenation (capped at V*D)
    nlist: int = 0  # rule: power of two nearest 4*sqrt(n), at most n/39
    pq_m: int = 0  # rule: coarse_dim / 8 (one byte per 8 dims)
    nbits: int = 0  # rule: 8, fewer when a part has under 4*256 rows
    codes: str = "sq8"  # "sq8": 8-bit scalar codes (coarse_dim bytes); "pq": product codes (pq_m bytes)
    opq: bool = False  # learn a rotation before PQ (faiss OPQMatrix; codes="pq" only)
    rerank: int = 32  # candidates per query (and rotation) re-ranked with the full vectors
    nprobe: int = 0  # search breadth before tuning; rule: IVF nlist / 16 lists, HNSW efSearch 2 * rerank
    train_size: int = 100_000  # at most this many sampled rows train the projection and quantizers
    seed: int = 0


def resolve_params(cfg: ApproxConfig, n: int, dim_in: int) -> dict:
    """The parameters one part of n rows gets under the rule (explicit values kept)."""
    coarse = min(cfg.coarse_dim or dim_in, dim_in)
    nlist = cfg.nlist or 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    nlist = max(1, min(nlist, n // _MIN_PER_LIST or 1))
    pq_m = cfg.pq_m or max(1, coarse // 8)  # 8 dims per byte (faiss trains 4-dim sub-spaces ~25x slower)
    if coarse % pq_m:
        raise InputValueError(f"PQ sub-quantizers pq_m={pq_m} must divide the coarse dimension {coarse}")
    nbits = cfg.nbits or max(1, min(8, int(math.log2(max(n // 4, 2)))))  # >= 4 training rows per PQ centroid
    if cfg.kind not in ("hnsw", "ivf"):
        raise InputValueError(f"approximate kind must be 'hnsw' or 'ivf', got {cfg.kind!r}")
    if cfg.codes not in ("sq8", "pq") or (cfg.kind == "hnsw" and cfg.codes != "sq8"):
        raise InputValueError(f"approximate codes must be 'sq8' (hnsw) or 'sq8'/'pq' (ivf), got {cfg.codes!r}")
    if cfg.kind == "hnsw" and min(cfg.hnsw_m, cfg.ef_construction) < 2:
        raise InputValueError(f"hnsw_m and ef_construction must be at least 2, got {cfg.hnsw_m}, {cfg.ef_construction}")
    nprobe = cfg.nprobe or (max(1, nlist // 16) if cfg.kind == "ivf" else 2 * cfg.rerank)
    nlist = nlist if cfg.kind == "ivf" else 0  # no lists in a graph
    return {"kind": cfg.kind, "hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction,
            "coarse_dim": coarse, "nlist": nlist, "codes": cfg.codes, "pq_m": pq_m, "nbits": nbits,
            "opq": cfg.opq and cfg.codes == "pq", "nprobe": nprobe, "rerank": cfg.rerank}


def coarse_vectors(embeddings: torch.Tensor, view_mask: torch.Tensor) -> np.ndarray:
    """(n, V, D) -> (n, V*D) fp32, missing views zero: the upstream score is one inner product."""
    x = embeddings.float() * view_mask[..., None].float()  # (n, V, D)
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())


def _projection(sample: np.ndarray, dim: int, seed: int) -> np.ndarray | None:
    """(dim, V*D) top right-singular vectors of the uncentred sample; None when no reduction."""
    if dim >= sample.shape[1]:
        return None
    torch.manual_seed(seed)
    _, _, v = torch.svd_lowrank(torch.from_numpy(sample), q=min(dim + 16, *sample.shape), niter=4)
    if v.shape[1] < dim:  # fewer sample rows than dims: pad with an orthonormal complement
        q, _ = torch.linalg.qr(torch.cat([v, torch.randn(v.shape[0], dim - v.shape[1])], 1))
        v = q
    return np.ascontiguousarray(v[:, :dim].T.numpy().astype(np.float32))


def _faiss_index(params: dict):
    """An untrained HNSW-SQ8 or IVF (inner product) on `coarse_dim` dims, IVF-PQ optionally behind OPQ."""
    import faiss

    d = params["coarse_dim"]
    if params["kind"] == "hnsw":
        graph = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = params["ef_construction"]
        return graph, graph
    if params["codes"] == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, params["nlist"], faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, params["nlist"], params["pq_m"], params["nbits"],
                               faiss.METRIC_INNER_PRODUCT)
        ivf.pq.cp.min_points_per_centroid = 1
        ivf.do_polysemous_training = False  # codes are only used for candidates: no Hamming filter
    ivf.cp.min_points_per_centroid = 1  # small parts: no warning, the rule already sized nlist
    inner = faiss.IndexPreTransform(faiss.OPQMatrix(d, params["pq_m"]), ivf) if params["opq"] else ivf
    return inner, ivf


def _wrap_projection(inner, proj: np.ndarray | None, dim_in: int):
    import faiss

    if proj is None:
        return inner
    lt = faiss.LinearTransform(dim_in, proj.shape[0], False)
    faiss.copy_array_to_vector(proj.ravel(), lt.A)
    lt.is_trained = True
    if isinstance(inner, faiss.IndexPreTransform):
        inner.prepend_transform(lt)
        return inner
    return faiss.IndexPreTransform(lt, inner)


def _reduced(part: PartRows, view_mask: torch.Tensor, rows: np.ndarray, proj: np.ndarray | None,
             chunk: int) -> np.ndarray:
    """(len(rows), coarse_dim) projected coarse vectors, read `chunk` rows at a time."""
    out = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        x = coarse_vectors(part.rows(r), view_mask[r])  # (m, V*D)
        _check_finite(x, part.file)
        out.append(x if proj is None else x @ proj.T)
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, 0), dtype=np.float32)


def build_part_faiss(part: PartRows, view_mask: torch.Tensor, cfg: ApproxConfig, chunk: int = 8192):
    """Train and fill one part's FAISS index; returns (index, params). Memory: one chunk of full
    vectors plus the projected training sample."""
    n, v, d = part.shape
    params = resolve_params(cfg, n, v * d)
    rng = np.random.default_rng(cfg.seed)
    train_rows = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
    svd_rows = np.sort(rng.choice(train_rows, size=min(len(train_rows), 20_000), replace=False))
    proj = _projection(_reduced(part, view_mask, svd_rows, None, chunk), params["coarse_dim"], cfg.seed)
    inner, _ = _faiss_index(params)
    inner.train(_reduced(part, view_mask, train_rows, proj, chunk))
    for start in range(0, n, chunk):
        inner.add(_reduced(part, view_mask, np.arange(start, min(n, start + chunk)), proj, chunk))
    part.release()
    return _wrap_projection(inner, proj, v * d), params


def _check_finite(x: np.ndarray, file: Path) -> None:
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise RetrievalIndexError(f"{file}: vectors contain non-finite values (NaN or inf); rebuild the index")


def approx_name(part: int) -> str:
    return f"approx-{part:05d}.faiss"


def write_part_faiss(index_dir: str | Path, part: int, index, params: dict) -> dict:
    """Serialise one part's index atomically; returns its file record (name, count, sha256, parameters)."""
    import faiss

    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(Path(index_dir) / approx_name(part), data)
    return {"name": approx_name(part), "part": part, "count": int(index.ntotal), "sha256": bytes_sha256(data),
            **{k: params[k] for k in ("kind", "coarse_dim", "nlist", "codes", "pq_m", "nbits", "nprobe")},
            **({"hnsw_m": params["hnsw_m"], "ef_construction": params["ef_construction"]} if params["kind"] == "hnsw" else {})}


def write_section(index_dir: str | Path, cfg: ApproxConfig, files: list[dict], tuning: dict | None = None) -> dict:
    """Add (or replace) the header's `approximate` section; returns the new header."""
    header = read_header(index_dir)
    nprobe = (tuning or {}).get("nprobe") or max([f["nprobe"] for f in files], default=1)
    partial = (tuning or {}).get("nprobe_partial") or nprobe
    header[SECTION] = {"kind": f"{cfg.kind}-{cfg.codes}", "config": asdict(cfg), "nprobe": int(nprobe),
                       "nprobe_partial": int(partial), "rerank": int(cfg.rerank),
                       "files": files, "tuning": tuning or {}}
    atomic_write_json(Path(index_dir) / HEADER, header)
    return header


def rank_parts(num_parts: int, rank: int, world: int) -> list[int]:
    """The part numbers rank `rank` of `world` builds and searches (round robin: each rank its
    own part when the index was built with as many ranks)."""
    return [i for i in range(num_parts) if i % world == rank]


def part_view_mask(file: str | Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor("view_mask").bool()
