#!/usr/bin/env python
"""Exact vs approximate search at city scale (`bench_search.py --approximate` runs this).

Per database size N: a proxy database of the demo model's embeddings (proxy_embeddings.py;
float16 parts written in chunks to --work), the approximate index built with the rule's
parameters and `--target-recall` tuning on held-out queries, then in ONE fresh process:
the approximate search of --queries queries and the exact CPU path (group_topk's torch path
over the memory-mapped parts, 8,192 rows at a time) on the first --exact-queries of them.
Reported: build seconds, peak resident set of the search process (absolute, and beyond its
state before loading the index), queries/s of both, recall of the exact top-k.

    python benchmarks/bench_search.py --approximate --locations 100000 1000000
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.bench_search import _status_kb  # noqa: E402
from benchmarks.proxy_embeddings import V, Proxy, write_part_streamed  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402

MODEL = Path(__file__).parent / "results" / "demo_embedding_model.json"


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def generate(work: Path, n: int, dim: int, num_queries: int, seed: int = 0, model: Path = MODEL) -> None:
    """Write the exact index (one float16 part, header) and queries.safetensors into `work`."""
    from safetensors.torch import save_file

    from text4vpr.retrieval.index import write_header

    proxy = Proxy(json.loads(Path(model).read_text()), dim=dim, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q_rows = torch.randperm(n, generator=g)[:num_queries].sort().values
    texts, chunk = [], 16384

    def chunks():
        for start in range(0, n, chunk):
            block = proxy.images(min(chunk, n - start), g)  # (B, V, D)
            local = q_rows[(q_rows >= start) & (q_rows < start + block.shape[0])] - start
            texts.append(proxy.texts(block[local], g))
            yield block

    work.mkdir(parents=True, exist_ok=True)
    meta = {"format": "text4vpr-index", "config_hash": "proxy", "weights_digest": "", "shards_digest": ""}
    write_part_streamed(work / "part-00000.safetensors", n, dim, chunks(), meta)
    write_header(work, "proxy", dim, V, "float16", [n])
    perm = torch.randperm(num_queries, generator=g)  # queries in random order (not sorted by row)
    save_file({"queries": torch.cat(texts)[perm].contiguous(), "rows": q_rows[perm].contiguous()}, str(work / "queries.safetensors"))


def build(work: Path, args) -> dict:
    from safetensors.torch import load_file

    from text4vpr.retrieval.approx_build import build_approximate
    from text4vpr.retrieval.approx_index import ApproxConfig

    q = load_file(str(work / "queries.safetensors"))["queries"]
    tune = q[args.queries :]  # held out: never among the measured queries
    cfg = ApproxConfig(kind=args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                       coarse_dim=args.coarse_dim, rerank=args.rerank, opq=args.opq)
    _reset_peak()
    base = _status_kb("VmRSS:")
    t0 = time.perf_counter()
    header = build_approximate(work, cfg, tune_queries=tune, tune_mask=torch.ones(tune.shape[:2], dtype=torch.bool),
                               target_recall=args.target_recall, tune_modes=("upstream",))
    return {"build_s": time.perf_counter() - t0, "build_peak_rss_mb": _status_kb("VmHWM:") / 1024,
            "build_base_rss_mb": base / 1024, "approximate": {k: v for k, v in header["approximate"].items() if k != "config"}}


def search(work: Path, args) -> dict:
    """Fresh process: load, approximate search of all queries, exact path on the first few."""
    from safetensors.torch import load_file

    from text4vpr.retrieval.approx_load import load_approx_index
    from text4vpr.retrieval.approx_search import approx_topk
    from text4vpr.retrieval.approx_tune import exact_topk, recall

    q = load_file(str(work / "queries.safetensors"))["queries"][: args.queries].float()
    base = _status_kb("VmRSS:")
    _reset_peak()
    approx = load_approx_index(work)
    approx_topk(approx, q[:32], None, args.k)  # warm-up
    t0 = time.perf_counter()
    _, found = approx_topk(approx, q, None, args.k)
    approx_s = time.perf_counter() - t0
    out = {"base_rss_mb": base / 1024, "approx_peak_rss_mb": _status_kb("VmHWM:") / 1024, "approx_s": approx_s,
           "approx_qps": q.shape[0] / approx_s, "queries": q.shape[0], "exact_queries": args.exact_queries}
    out["approx_extra_rss_mb"] = out["approx_peak_rss_mb"] - out["base_rss_mb"]
    _reset_peak()
    before = _status_kb("VmRSS:")
    e = q[: args.exact_queries]
    t0 = time.perf_counter()
    _, truth = exact_topk(approx, e, None, args.k)
    out["exact_s"] = time.perf_counter() - t0
    out["exact_qps"] = e.shape[0] / out["exact_s"]
    out["exact_extra_rss_mb"] = _status_kb("VmHWM:") / 1024 - before / 1024
    out["recall_at_k"] = recall(found[: e.shape[0]], truth)
    out["speedup"] = out["approx_qps"] / out["exact_qps"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--locations", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=2048, help="per-view dimension D")
    p.add_argument("--queries", type=int, default=2000, help="approximate queries timed")
    p.add_argument("--exact-queries", type=int, default=100, help="of them, timed on the exact path (recall on these)")
    p.add_argument("--tune-queries", type=int, default=200, help="held-out queries for --target-recall")
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw", help="approximate index kind")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--coarse-dim", type=int, default=256)
    p.add_argument("--rerank", type=int, default=32)
    p.add_argument("--opq", action="store_true")
    p.add_argument("--work", default="/tmp/text4vpr_bench_approx", help="folder for the generated databases")
    p.add_argument("--keep", action="store_true", help="keep the generated databases")
    p.add_argument("--proxy-model", default=str(MODEL), help="fitted model the database is drawn from")
    p.add_argument("--reuse", action="store_true", help="use a database kept in --work by an earlier --keep run")
    p.add_argument("--phase", choices=("all", "generate", "build", "search"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/bench_search_approx_cpu.json)")
    return p.parse_args(argv)


def _phase(phase: str, work: Path, argv: list[str]) -> dict:
    """Run one phase in a fresh process (clean resident-set figures); returns its JSON."""
    cmd = [sys.executable, __file__, *argv, "--phase", phase, "--work", str(work)]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child_args(args) -> list[str]:
    out = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
           ("dim", "queries", "exact-queries", "tune-queries", "target-recall", "k", "kind", "hnsw-m", "ef-construction", "coarse-dim", "rerank", "proxy-model")]
    return out + (["--opq"] if args.opq else [])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--approximate"]
    args = parse_args(argv)
    if args.phase != "all":  # a child: one size, one phase, JSON on the last line
        work, n = Path(args.work), args.locations[0]
        if args.phase == "generate":
            t0 = time.perf_counter()
            generate(work, n, args.dim, args.queries + args.tune_queries, model=args.proxy_model)
            print(json.dumps({"generate_s": time.perf_counter() - t0}))
        else:
            print(json.dumps((build if args.phase == "build" else search)(work, args)))
        return 0
    results = []
    for n in args.locations:
        work = Path(args.work) / f"n{n}_d{args.dim}"
        child = _child_args(args) + ["--locations", str(n)]
        row = {"locations": n, "dim": V * args.dim, "k": args.k}
        reuse = args.reuse and (work / "queries.safetensors").is_file()
        for phase in ("build", "search") if reuse else ("generate", "build", "search"):
            row.update(_phase(phase, work, child))
            print(f"N={n}: {phase} done {json.dumps(row)}", file=sys.stderr, flush=True)
        results.append(row)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    _print_table(results)
    meta = {"date": datetime.date.today().isoformat(), "torch_threads": torch.get_num_threads(),
            "command": " ".join(["python benchmarks/bench_search.py --approximate", *argv]),
            "database": "proxy of the demo model's embeddings (benchmarks/proxy_embeddings.py), float16 parts"}
    out = Path(args.out or Path(__file__).parent / "results" / "bench_search_approx_cpu.json")
    atomic_write_json(out, {"meta": meta, "results": results})
    print(f"wrote {out}")
    return 0


def _print_table(results: list[dict]) -> None:
    print("| N | build s | kind: breadth | search peak RSS MiB (beyond start) | approx q/s | exact q/s | speed-up | recall@k |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['locations']:,} | {r['build_s']:.0f} | {r['approximate']['kind']}: {r['approximate']['nprobe']}, partial {r['approximate'].get('nprobe_partial')} | {r['approx_peak_rss_mb']:.0f} "
              f"({r['approx_extra_rss_mb']:.0f}) | {r['approx_qps']:.0f} | {r['exact_qps']:.2f} | {r['speedup']:.0f}x | "
              f"{r['recall_at_k']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
