#!/usr/bin/env python
"""Group top-k search: fused Triton kernel, torch path, GEMM alone, faiss flat, upstream loop.

One run measures, per size (Q queries x N locations x V*D dims) and k: seconds, queries/s,
effective TFLOP/s (2*Q*N*V*D / time, i.e. counting the GEMM a search implies) and peak
extra memory of each path. Upstream = per-query numpy dot + argsort over the whole
database (test/test.py). faiss = IndexFlatIP on the flattened V*D vectors (CPU, if
installed: `pip install faiss-cpu`, the `approx` extra). Triton runs on CUDA only.

Memory: CUDA, torch.cuda.max_memory_allocated beyond the inputs; CPU, the peak resident set
(VmHWM after resetting it via /proc/self/clear_refs) beyond the resident set before the call.

    python benchmarks/bench_search.py                      # CPU, 1000 x 1000 x 8192
    python benchmarks/bench_search.py --device cuda --sizes 16384x1048576 --skip upstream faiss
    python benchmarks/bench_search.py --approximate --locations 100000 1000000   # benchmarks/bench_approx.py
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from text4vpr.kernels.topk import group_topk  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402

PATHS = ("triton", "torch", "gemm", "faiss", "upstream")


# ----------------------------------------------------------------------------- memory probes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak bytes allocated beyond the state at entry (CUDA allocator, or process RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = _status_kb("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = max(0, _status_kb("VmHWM:") * 1024 - self.base)


# ----------------------------------------------------------------------------- the paths


def run_path(name: str, q: torch.Tensor, db: torch.Tensor, k: int):
    """Run one search path once; returns its ids (Q, k) or None for the GEMM alone."""
    if name in ("triton", "torch"):
        return group_topk(q, None, db, None, k, "upstream", backend=name)[1]
    if name == "gemm":  # the ceiling: the same chunked GEMM, no selection
        qf, dbf = q.reshape(q.shape[0], -1), db.reshape(db.shape[0], -1)
        chunk = max(1024, (512 * 2**20) // (4 * q.shape[0]))
        for s in range(0, dbf.shape[0], chunk):
            out = torch.mm(qf, dbf[s : s + chunk].T) if qf.dtype == torch.float32 or not qf.is_cuda else \
                torch.mm(qf, dbf[s : s + chunk].T, out_dtype=torch.float32)
        del out
        return None
    if name == "faiss":
        import faiss

        index = faiss.IndexFlatIP(db.shape[1] * db.shape[2])
        index.add(db.reshape(db.shape[0], -1).float().numpy())
        return torch.from_numpy(index.search(q.reshape(q.shape[0], -1).float().numpy(), k)[1])
    if name == "upstream":  # test/test.py: one query at a time, full argsort
        images = db.reshape(db.shape[0], -1).float().numpy()
        texts = q.reshape(q.shape[0], -1).float().numpy()
        return torch.from_numpy(np.stack([np.argsort(-(images @ t))[:k] for t in texts]))
    raise ValueError(name)


def available(name: str, device: torch.device) -> str | None:
    """None when the path can run here, else why not."""
    if name == "triton" and device.type != "cuda":
        return "GPU only"
    if name in ("faiss", "upstream") and device.type != "cpu":
        return "CPU path (run with --device cpu)"
    if name == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss-cpu not installed"
    return None


def _timed(name, q, db, k, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_path(name, q, db, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(names, q, db, k, repeats, device) -> dict:
    """Warm-up + peak memory per path, then `repeats` rounds interleaving the paths (min time),
    so that load from other jobs hits every path alike."""
    out = {}
    for name in names:
        try:  # one failing path (a Triton compile or resource error) must not cost the others' figures
            with PeakMemory(device) as mem:
                run_path(name, q, db, k)  # warm-up (compiles the Triton kernel)
            out[name] = {"peak_extra_bytes": mem.extra}
        except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
            print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            out[name] = {"unavailable": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    names = [n for n in names if "unavailable" not in out[n]]
    times = {n: [] for n in names}
    for _ in range(repeats):
        for name in [n for n in names if "unavailable" not in out[n]]:
            try:
                times[name].append(_timed(name, q, db, k, device))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory on a repeat
                print(f"{name}: failed while timed: {type(e).__name__}: {e}", file=sys.stderr)
                out[name] = {"unavailable": f"failed while timed: {type(e).__name__}: {str(e)[:200]}"}
    flop = 2.0 * q.shape[0] * db.shape[0] * q.shape[1] * q.shape[2]
    for name in [n for n in names if "unavailable" not in out[n]]:
        t = min(times[name])
        out[name].update(seconds=t, queries_per_s=q.shape[0] / t, tflops=flop / t / 1e12)
    return out


# ----------------------------------------------------------------------------- driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", nargs="+", default=None,
                   help="QxN sizes (default: 1000x1000 on CPU; 1024x65536 4096x262144 16384x1048576 on CUDA)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--dim", type=int, default=2048, help="per-view dimension D (V*D = 8192 by default)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: fp32 CPU, bf16 CUDA")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (min is reported)")
    p.add_argument("--skip", nargs="*", default=[], choices=PATHS, help="paths to leave out")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/bench_search_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--approximate" in argv:  # exact vs approximate (FAISS + re-rank) at 10^5-10^6 locations
        from benchmarks.bench_approx import main as approx_main

        return approx_main(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (["1000x1000"] if device.type == "cpu" else ["1024x65536", "4096x262144", "16384x1048576"])
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    rows, results = [], []
    for size in sizes:
        nq, nd = (int(x) for x in size.lower().split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(nq, args.views, args.dim, device=device, generator=g).to(dtype)
        db = torch.empty(nd, args.views, args.dim, device=device, dtype=dtype)
        for s in range(0, nd, 65536):  # chunked: a 1M x 8192 fp32 temporary would not fit an H100
            part = torch.randn(min(65536, nd - s), args.views, args.dim, device=device, generator=g)
            db[s : s + part.shape[0]] = torch.nn.functional.normalize(part, dim=-1).to(dtype)  # unit views
        for k in args.ks:
            why = {n: "skipped" if n in args.skip else available(n, device) for n in PATHS}
            res = measure([n for n in PATHS if not why[n]], q, db, k, args.repeats, device)
            res.update({n: {"unavailable": why[n]} for n in PATHS if why[n]})
            results.append({"queries": nq, "database": nd, "dim": args.views * args.dim, "k": k, "paths": res})
            up, fa = res["upstream"].get("seconds"), res["faiss"].get("seconds")
            for name in PATHS:
                r = res[name]
                if "unavailable" in r:
                    rows.append(f"| {nq}x{nd} | {k} | {name} | - | - | - | - | - | {r['unavailable']} |")
                    continue
                vs_up = f"{up / r['seconds']:.1f}x" if up else "-"
                vs_fa = f"{fa / r['seconds']:.2f}x" if fa else "-"
                rows.append(f"| {nq}x{nd} | {k} | {name} | {r['seconds']:.4f} | {r['queries_per_s']:.0f} | "
                            f"{r['tflops']:.3f} | {r['peak_extra_bytes'] / 2**20:.1f} | {vs_up} / {vs_fa} | |")
    header = ["| Q x N | k | path | s | queries/s | eff. TFLOP/s | peak extra MiB | vs upstream / vs faiss | note |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    print("\n".join(header + rows))
    meta = {"date": datetime.date.today().isoformat(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch_threads": torch.get_num_threads(), "dtype": str(dtype), "command": " ".join(sys.argv)}
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_search_{device.type}.json")
    atomic_write_json(out, {"meta": meta, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
