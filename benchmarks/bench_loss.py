#!/usr/bin/env python
"""Plain vs tiled InfoNCE, forward+backward: time and peak memory as the batch grows.

Each (method, batch) runs in a fresh subprocess. Memory is the peak of tensor allocations
beyond the inputs during one forward+backward, the embedding gradients included: on CUDA
torch.cuda.max_memory_allocated, on CPU the profiler's allocation events (exact tensor
accounting, not the resident set). Fits: tiled memory linear in
B (slope printed, bytes per pair), plain memory a*B^2 + b*B; from the fits, the largest
batch whose inputs + loss memory fit in 8 GiB (extrapolated when not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

BUDGET = 8 * 2**30


def _cpu_peak_allocated(fn) -> int:
    """Peak bytes of CPU tensors allocated by `fn` beyond those alive before it, from the
    profiler's allocation events ("Total Allocated" after each allocation or free)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def child(method: str, b: int, d: int, block: int, repeats: int) -> dict:
    """One measurement: warm-up then `repeats` timed fwd+bwd; memory of the first run."""
    from text4vpr.losses import ContrastiveLoss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_fn = ContrastiveLoss(0.1, tiled=method == "tiled", block_size=block, distributed=False)
    g = torch.Generator(device=device).manual_seed(0)
    img = torch.randn(b, d, device=device, generator=g).requires_grad_()
    txt = torch.randn(b, d, device=device, generator=g).requires_grad_()

    def run():
        img.grad = txt.grad = None
        loss_fn(img, txt).backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = _cpu_peak_allocated(run)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"method": method, "batch": b, "seconds": min(times), "extra_bytes": max(extra, 0),
            "input_bytes": 2 * b * d * 4, "device": device.type}


def measure(method: str, b: int, d: int, block: int, repeats: int) -> dict | None:
    cmd = [sys.executable, __file__, "--child", method, str(b), str(d), str(block), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} B={b}: failed ({proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lstsq(xs: list[list[float]], ys: list[float]) -> list[float]:
    a = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(a, y).solution[:, 0].tolist()


def largest_batch(mem_of_b, d: int) -> int:
    """Largest B (to 1 %) with inputs 2*B*D*4 + loss memory <= 8 GiB."""
    lo, hi = 1, 1 << 30
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        if 2 * mid * d * 4 + mem_of_b(mid) <= BUDGET:
            lo = mid
        else:
            hi = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="comma list (default CPU 1024..8192, CUDA 1024..65536)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--block", type=int, default=None, help="tile size (default 1024 CPU, 4096 CUDA)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, b, d, blk, rep = args.child
        print(json.dumps(child(m, int(b), int(d), int(blk), int(rep))))
        return

    cuda = torch.cuda.is_available()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [1024, 2048, 4096, 8192, 16384, 32768, 65536] if cuda else [1024, 2048, 4096, 8192])
    block = args.block or (4096 if cuda else 1024)
    rows = []
    for b in sizes:
        for method in ("plain", "tiled"):
            r = measure(method, b, args.dim, block, args.repeats)
            if r:
                rows.append(r)
    by = {(r["method"], r["batch"]): r for r in rows}

    print(f"device={'cuda' if cuda else 'cpu'} D={args.dim} block={block} threads={torch.get_num_threads()}")
    print(f"{'B':>7s} {'plain s':>9s} {'tiled s':>9s} {'tiled/plain':>11s} {'plain MiB':>10s} {'tiled MiB':>10s}")
    for b in sizes:
        p, t = by.get(("plain", b)), by.get(("tiled", b))
        ratio = f"{t['seconds'] / p['seconds']:.2f}" if p and t else "-"
        print(f"{b:7d} {p['seconds'] if p else float('nan'):9.3f} {t['seconds'] if t else float('nan'):9.3f} "
              f"{ratio:>11s} {p['extra_bytes'] / 2**20 if p else float('nan'):10.1f} "
              f"{t['extra_bytes'] / 2**20 if t else float('nan'):10.1f}")

    tiled = [r for r in rows if r["method"] == "tiled"]
    plain = [r for r in rows if r["method"] == "plain"]
    fits = {}
    if len(tiled) >= 2:
        slope, icpt = _lstsq([[r["batch"], 1.0] for r in tiled], [r["extra_bytes"] for r in tiled])
        fits["tiled"] = {"bytes_per_pair": slope, "intercept_bytes": icpt,
                         "embedding_grads_bytes_per_pair": 2 * args.dim * 4,
                         "largest_batch_8GiB": largest_batch(lambda b: slope * b + icpt, args.dim)}
        print(f"tiled memory slope: {slope:.0f} bytes/pair ({slope / (args.dim * 4):.2f} x D floats; "
              f"the two embedding gradients alone are {2 * args.dim * 4} bytes/pair)")
    if len(plain) >= 2:
        qa, qb = _lstsq([[r["batch"] ** 2, r["batch"]] for r in plain], [r["extra_bytes"] for r in plain])
        fits["plain"] = {"bytes_per_pair_squared": qa, "bytes_per_pair": qb,
                         "largest_batch_8GiB": largest_batch(lambda b: qa * b * b + qb * b, args.dim)}
        print(f"plain memory fit: {qa:.1f} bytes * B^2 + {qb:.0f} bytes * B")
    where = "measured on CUDA" if cuda else "extrapolated from the CPU fits"
    for m in ("plain", "tiled"):
        if m in fits:
            print(f"largest batch within 8 GiB ({m}, inputs + loss memory, {where}): {fits[m]['largest_batch_8GiB']:,}")

    from text4vpr.utils.atomic import atomic_write_json

    out = Path(args.out or f"benchmarks/results/bench_loss_{'cuda' if cuda else 'cpu'}.json")
    memory = ("cuda max_memory_allocated beyond inputs" if cuda
              else "peak CPU tensor allocation beyond inputs (torch.profiler memory events)")
    atomic_write_json(out, {"device": "cuda" if cuda else "cpu",
                            "gpu": torch.cuda.get_device_name() if cuda else None, "dim": args.dim,
                            "block": block, "sizes": sizes, "memory": memory, "torch": torch.__version__,
                            "platform": platform.platform(), "results": rows, "fits": fits})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
