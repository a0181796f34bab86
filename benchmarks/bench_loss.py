#!/usr/bin/env python
"""The loss, forward+backward, against an open_clip-style reference in the same run: time ratio and peak memory.

The reference is open_clip's `ClipLoss` math for one process (two logits matrices, two
cross-entropies), times 2 (ours is the sum of both directions), written out here
(`open-clip-torch` would replace this environment's torch). Both get unit-norm inputs.
Each (method, batch) runs in a fresh subprocess, the methods interleaved round by round;
the time is the best round. Memory: the peak of tensor allocations beyond the inputs during
one forward+backward, the input gradients included (CUDA: max_memory_allocated; CPU: the
profiler's allocation events, exact tensor accounting, not the resident set).
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
import torch.nn.functional as F  # noqa: E402

METHODS = ("reference", "plain", "tiled")


def reference_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip ClipLoss (world size 1) on unit (N, D) features, times 2: the sum of both directions."""
    logits_per_image = logit_scale * img @ txt.T  # (N, N)
    logits_per_text = logit_scale * txt @ img.T  # (N, N)
    labels = torch.arange(img.shape[0], device=img.device)
    return F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)


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


def _loss_fn(method: str, block: int, device: torch.device):
    """(img, txt) -> loss at temperature 0.1."""
    if method == "reference":
        scale = torch.tensor(10.0, device=device)
        return lambda i, t: reference_loss(i, t, scale)
    from text4vpr.losses import ContrastiveLoss

    return ContrastiveLoss(0.1, tiled=method == "tiled", block_size=block, distributed=False).to(device)


def child(method: str, b: int, d: int, block: int, memory: bool) -> dict:
    """One timed forward+backward (after a small warm-up, and a memory-measuring one when `memory`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_fn = _loss_fn(method, block, device)
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).requires_grad_()
    out = {}

    def run(n=b):
        img.grad = txt.grad = None
        loss = loss_fn(img[:n], txt[:n])
        loss.backward()
        out["loss"] = float(loss)

    run(min(b, 64))  # first calls' one-time set-up, outside what is measured

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    extra = None
    if memory and device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        sync()
        extra = torch.cuda.max_memory_allocated() - base
    elif memory:
        extra = _cpu_peak_allocated(run)
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    return {"method": method, "batch": b, "seconds": time.perf_counter() - t0, "loss": out["loss"],
            "extra_bytes": extra, "device": device.type}


def measure(method: str, b: int, d: int, block: int, memory: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--child", method, str(b), str(d), str(block), str(int(memory))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} B={b}: failed ({proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_rows(sizes, methods, d: int, block: int, rounds: int) -> list[dict]:
    """Per (method, batch): memory from round 1, the least time over `rounds` interleaved rounds."""
    best: dict[tuple[str, int], dict] = {}
    for b in sizes:
        for r in range(rounds):
            for m in methods:
                row = measure(m, b, d, block, memory=r == 0)
                if row is None:
                    continue
                key = (m, b)
                if key not in best:
                    best[key] = row
                else:
                    best[key]["seconds"] = min(best[key]["seconds"], row["seconds"])
                print(f"  B={b} {m} round {r + 1}: {row['seconds']:.2f} s", file=sys.stderr, flush=True)
    return list(best.values())


def _mib(row: dict | None) -> str:
    return f"{row['extra_bytes'] / 2**20:10.1f}" if row and row["extra_bytes"] is not None else f"{'-':>10s}"


def main() -> None:
    from text4vpr.losses import DEFAULT_BLOCK

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,16384", help="comma list of pairs per batch")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="tile side of the tiled loss")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best time is kept")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, b, d, blk, mem = args.child
        print(json.dumps(child(m, int(b), int(d), int(blk), mem == "1")))
        return

    cuda = torch.cuda.is_available()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    rows = best_rows(sizes, methods, args.dim, args.block, args.repeats)
    by = {(r["method"], r["batch"]): r for r in rows}
    print(f"device={'cuda' if cuda else 'cpu'} D={args.dim} block={args.block} threads={torch.get_num_threads()} "
          f"repeats={args.repeats}; speed = reference time / ours (>= 1: ours faster)")
    print(f"{'B':>7s} {'ref s':>8s} {'plain s':>8s} {'tiled s':>8s} {'plain spd':>9s} {'tiled spd':>9s} "
          f"{'ref MiB':>10s} {'plain MiB':>10s} {'tiled MiB':>10s}")
    for b in sizes:
        ref, p, t = (by.get((m, b)) for m in METHODS)
        secs = [f"{r['seconds']:8.2f}" if r else f"{'-':>8s}" for r in (ref, p, t)]
        spd = [f"{ref['seconds'] / r['seconds']:9.2f}" if ref and r else f"{'-':>9s}" for r in (p, t)]
        print(f"{b:7d} {' '.join(secs)} {' '.join(spd)} {_mib(ref)} {_mib(p)} {_mib(t)}")
        for r in (p, t):  # the same function: the values must agree
            if ref and r and abs(r["loss"] - ref["loss"]) > 1e-4 * abs(ref["loss"]):
                raise SystemExit(f"{r['method']} loss {r['loss']} != reference {ref['loss']} at B={b}")
    tiled = sorted((r["batch"], r["extra_bytes"]) for r in rows
                   if r["method"] == "tiled" and r["batch"] > args.block and r["extra_bytes"] is not None)
    if len(tiled) >= 2:  # beyond one tile the workspace is constant: the slope is the per-pair memory
        (b0, m0), (b1, m1) = tiled[0], tiled[-1]
        print(f"tiled memory slope B={b0}..{b1}: {(m1 - m0) / (b1 - b0):.0f} bytes/pair "
              f"(the two input gradients alone: {2 * args.dim * 4}); workspace {(m0 - b0 * (m1 - m0) / (b1 - b0)) / 2**20:.0f} MiB")

    from text4vpr.utils.atomic import atomic_write_json

    out = Path(args.out or f"benchmarks/results/bench_loss_{'cuda' if cuda else 'cpu'}.json")
    memory = ("cuda max_memory_allocated beyond inputs" if cuda
              else "peak CPU tensor allocation beyond inputs (torch.profiler memory events)")
    atomic_write_json(out, {"device": "cuda" if cuda else "cpu",
                            "gpu": torch.cuda.get_device_name() if cuda else None, "dim": args.dim,
                            "block": args.block, "sizes": sizes, "repeats": args.repeats, "memory": memory,
                            "reference": "open_clip ClipLoss math (world size 1) x 2, unit inputs",
                            "torch": torch.__version__, "platform": platform.platform(), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
