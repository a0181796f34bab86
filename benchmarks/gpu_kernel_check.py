#!/usr/bin/env python
"""The fused Triton group top-k against the torch path at full sizes (GPU check; exits 1 on a mismatch).

Random bf16 queries (Q, V, D) and unit-view database (N, V, D), some views masked, every
mode, k = 10 and 100: scores must agree to 1e-3 of the largest score, and the ids wherever
the two paths' scores are not within that tolerance of a tie (near-ties may swap order).

    python benchmarks/gpu_kernel_check.py                                  # CUDA, 2048 x 262144 x 4x2048
    TRITON_INTERPRET=1 python benchmarks/gpu_kernel_check.py --device cpu --queries 8 --database 256 --dim 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from text4vpr.kernels.common import MODES  # noqa: E402
from text4vpr.kernels.topk import group_topk  # noqa: E402
from tests.helpers import unexplained_id_differences  # noqa: E402


def check(q, qm, db, dm, k: int, mode: str) -> tuple[bool, str]:
    t0 = time.perf_counter()
    s_tr, i_tr = group_topk(q, qm, db, dm, k, mode, backend="triton")
    s_to, i_to = group_topk(q, qm, db, dm, k, mode, backend="torch")
    sec = time.perf_counter() - t0
    tol = 1e-3 * float(s_to.abs().max().clamp(min=1e-6))
    score_err = float((s_tr - s_to).abs().max())
    same = i_tr == i_to
    bad = unexplained_id_differences(i_tr, i_to, s_to, tol)  # an id may differ only at a near-tie
    ok = score_err <= tol and bad == 0
    return ok, (f"mode={mode:12s} k={k:3d}: max score diff {score_err:.2e} (tol {tol:.2e}), ids equal "
                f"{100 * float(same.float().mean()):.3f} %, unexplained id differences {bad} ({sec:.1f} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--database", type=int, default=262144)
    p.add_argument("--dim", type=int, default=2048, help="per view")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(args.queries, 4, args.dim, device=dev, generator=g).to(dtype)
    db = torch.nn.functional.normalize(torch.randn(args.database, 4, args.dim, device=dev, generator=g), dim=-1).to(dtype)
    qm = torch.rand(args.queries, 4, device=dev, generator=g) < 0.9
    dm = torch.rand(args.database, 4, device=dev, generator=g) < 0.95
    print(f"triton vs torch: {args.queries} x {args.database} x 4x{args.dim} {dtype} on {dev}")
    failed = 0
    for mode in MODES:
        for k in args.ks:
            ok, line = check(q, qm, db, dm, k, mode)
            print(("ok   " if ok else "FAIL ") + line)
            failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
