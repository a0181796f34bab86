#!/usr/bin/env python
"""Evaluation end to end: the real evaluator vs the upstream path, same model shapes.

A synthetic split of N locations (all in the test split; JPEGs at --image-size, packed into
shards once, cached). Ours: `text4vpr.retrieval.evaluate.evaluate` on the shard loader
(batched encoders, bf16 autocast on CUDA, group top-k search, metrics), timed twice (the
first run includes one-off start-up: Triton compile, cuDNN/cuBLAS autotuning), and
`build_index` (encode + write the database) for reference. Upstream (test/test.py): the
DataFrame regrouped per location and JPEGs opened one by one (`bench_data.UpstreamStyleDataset`),
each description tokenised alone, every image and every description through its encoder
alone in fp32, then per query a numpy dot with the whole database and a full argsort, then
the same metrics. With --upstream-sample S < N the upstream encoding is timed on S locations
and scaled to N (its cost per location is constant), and its search runs on our vectors
(same shapes; the time does not depend on the values). With S = N both paths' accuracies are
printed (random-init weights: they agree up to float rounding, not with the truth).

    python benchmarks/bench_eval.py                                  # tiny model, CPU
    python benchmarks/bench_eval.py --device cuda --locations 1000   # paper shapes, random init
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_data import UpstreamStyleDataset  # noqa: E402
from benchmarks.common import machine, print_table, timed  # noqa: E402
from text4vpr.data.loader import LoaderConfig, build_loader  # noqa: E402
from text4vpr.data.shard_reader import shard_descriptions  # noqa: E402
from text4vpr.data.shards import BuildOptions, build_shards  # noqa: E402
from text4vpr.data.synthetic import SynthConfig, write_synthetic  # noqa: E402
from text4vpr.data.tokenizer import load_tokenizer, normalize_text, train_tokenizer  # noqa: E402
from text4vpr.models import Text4VPR, paper_config, tiny_config  # noqa: E402
from text4vpr.retrieval.defaults import KS, RADII  # noqa: E402
from text4vpr.retrieval.evaluate import encode_split, evaluate  # noqa: E402
from text4vpr.retrieval.index import build_index  # noqa: E402
from text4vpr.retrieval.metrics import topk_within_radius  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402



def prepare(root: Path, n: int, size: int, workers: int) -> tuple[Path, Path, Path]:
    """Synthetic split of n locations (test split only), its shards and a tokenizer, once."""
    raw, shards, tok = root / "raw", root / "shards", root / "tokenizer"
    if not (root / "READY").exists():
        print(f"preparing {n} synthetic locations at {size} px in {root} (cached)")
        write_synthetic(raw, SynthConfig(locations=n, image_size=size, split_fractions=(0.0, 0.0, 1.0), workers=workers))
        build_shards(raw / "test_description.xlsx", raw / "Street360Loc_images", shards,
                     BuildOptions(max_count=64, workers=workers), progress=False, log=None)
        train_tokenizer(shard_descriptions(shards), tok, vocab_size=1000)
        (root / "READY").write_text("ok\n")
    return raw, shards, tok


def run_ours(model, loader_cfg: LoaderConfig, device, index_dir: Path) -> dict:
    amp = device.type == "cuda"

    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return evaluate(model, build_loader(loader_cfg, "eval"), KS, RADII, device=device).metrics

    _, first = timed(once, device)
    metrics, warm = timed(once, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        _, index_s = timed(lambda: build_index(model, build_loader(loader_cfg, "eval"), index_dir), device)
    return {"first_s": first, "seconds": warm, "index_build_s": index_s, "accuracy": metrics["accuracy"],
            "bf16": amp}


@torch.no_grad()
def upstream_encode(model, ds, tokenizer, max_len: int, count: int, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, V*D) database and query vectors and (count, 3) coords, one item per call, fp32."""
    db, qs, xyz = [], [], []
    for i in range(count):
        images, texts, coords = ds[i]
        db.append(torch.cat([model.encode_images(img[None].to(device))[0] for img in images]).cpu().numpy())
        vecs = []
        for text in texts:
            t = tokenizer(normalize_text(text), truncation=True, max_length=max_len, return_tensors="pt")
            vecs.append(model.encode_texts(t["input_ids"].to(device), t["attention_mask"].to(device))[0])
        qs.append(torch.cat(vecs).cpu().numpy())
        xyz.append(coords.numpy())
    return np.stack(db), np.stack(qs), np.stack(xyz)


def upstream_search(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """test/test.py: per query, scores against the whole database, full argsort."""
    return np.stack([np.argsort(-(db @ q))[:k] for q in queries])


def run_upstream(model, raw: Path, tokenizer, loader_cfg, sample: int, n: int, device, ours_vectors) -> dict:
    model.float()
    ds = UpstreamStyleDataset(raw / "test_description.xlsx", raw / "Street360Loc_images", size=loader_cfg.image_size)
    (db, qs, xyz), enc_s = timed(lambda: upstream_encode(model, ds, tokenizer, loader_cfg.max_text_length, sample, device),
                                 device)
    if sample < n:  # search on our vectors (same shapes), encoding scaled to n
        db = ours_vectors["database"].flatten(1).numpy()
        qs = ours_vectors["queries"].flatten(1).numpy()
        xyz = ours_vectors["coords"].numpy()
    ids, search_s = timed(lambda: upstream_search(db, qs, max(KS)), device)
    acc, metrics_s = timed(lambda: topk_within_radius(ids, xyz, xyz, KS, RADII), device)
    encode_total = enc_s * n / sample
    return {"encode_sample_s": enc_s, "sample": sample, "encode_s": encode_total, "search_s": search_s,
            "metrics_s": metrics_s, "seconds": encode_total + search_s + metrics_s,
            "accuracy": acc if sample == n else None, "extrapolated": sample < n}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--config", default=None, choices=("tiny", "paper"), help="default: paper on CUDA, tiny on CPU")
    p.add_argument("--locations", type=int, default=None, help="split size N (default 1000 CUDA, 256 CPU)")
    p.add_argument("--image-size", type=int, default=None, help="default 252 paper, 56 tiny")
    p.add_argument("--text-length", type=int, default=None, help="max tokens (default 256 paper, as configs/street360loc.yaml; 96 tiny)")
    p.add_argument("--batch", type=int, default=None, help="locations per batch (default 64 paper, 16 tiny)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default min(8, cpus - 1))")
    p.add_argument("--upstream-sample", type=int, default=None, help="locations the upstream path encodes (default N on CPU, 100 on CUDA)")
    p.add_argument("--workdir", default=".cache/text4vpr", help="where the synthetic split is cached")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/bench_eval_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    name = args.config or ("paper" if cuda else "tiny")
    n = args.locations or (1000 if cuda else 256)
    size = args.image_size or (252 if name == "paper" else 56)
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    root = Path(args.workdir) / f"bench_eval-n{n}-px{size}"
    raw, shards, tok_dir = prepare(root, n, size, max(1, workers))
    tokenizer = load_tokenizer(tok_dir)
    loader_cfg = LoaderConfig(shards=str(shards), tokenizer=str(tok_dir), batch_size=args.batch or (64 if name == "paper" else 16),
                              image_size=size, num_workers=workers, image_dtype="uint8",
                              max_text_length=args.text_length or (256 if name == "paper" else 96))
    cfg = paper_config() if name == "paper" else tiny_config(vocab_size=len(tokenizer), image_size=size)
    torch.manual_seed(0)
    model = Text4VPR(cfg).to(device).eval()
    print(f"config={name} device={device} locations={n} ({4 * n} images, {4 * n} descriptions) image={size}px "
          f"text<={loader_cfg.max_text_length} tokens batch={loader_cfg.batch_size} workers={workers}")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(model, loader_cfg, device, Path(tmp) / "index")
    sample = min(n, args.upstream_sample or (100 if cuda else n))
    vectors = encode_split(model, build_loader(loader_cfg, "eval"), device) if sample < n else None
    up = run_upstream(model, raw, tokenizer, loader_cfg, sample, n, device, vectors)
    speedup = up["seconds"] / ours["seconds"]

    note = f"encoding timed on {sample} locations, scaled to {n}" if up["extrapolated"] else ""
    rows = [
        ["upstream: one item per encoder call (fp32) + numpy argsort per query", up["seconds"], n / up["seconds"], "1.00x", note],
        ["  of which encoding (loading, tokenising included)", up["encode_s"], None, None, ""],
        ["  of which search (numpy dot + argsort per query)", up["search_s"], None, None, ""],
        ["ours: evaluate() from shards (batched" + (", bf16" if cuda else ", fp32") + ")", ours["seconds"], n / ours["seconds"],
         f"{speedup:.1f}x", "second run"],
        ["ours: evaluate(), first run", ours["first_s"], n / ours["first_s"], f"{up['seconds'] / ours['first_s']:.1f}x",
         "includes start-up"],
        ["ours: build_index (encode + write database)", ours["index_build_s"], n / ours["index_build_s"], None, ""],
    ]
    print_table(["path", "s", "locations/s", "vs upstream", "note"], rows)
    if up["accuracy"]:
        a, b = ours["accuracy"], up["accuracy"]
        print(f"sanity check (random-init weights, both paths should agree): top-1 within 5 m ours {a['1']['5']:.4f} / "
              f"upstream {b['1']['5']:.4f}; top-10 within 30 m ours {a['10']['30']:.4f} / upstream {b['10']['30']:.4f}")

    out = Path(args.out or f"benchmarks/results/bench_eval_{device.type}.json")
    atomic_write_json(out, {"eval_speedup_vs_upstream": speedup, "locations": n, "config": name, "device": str(device),
                            "image_size": size, "loader": {"batch_size": loader_cfg.batch_size, "workers": workers,
                                                           "max_text_length": loader_cfg.max_text_length},
                            "ours": ours, "upstream": up, "machine": machine(), "command": " ".join(sys.argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
