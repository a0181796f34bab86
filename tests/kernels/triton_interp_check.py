"""Run under TRITON_INTERPRET=1 (by test_group_topk_triton.py): Triton kernel vs torch path.

Exits 1 and lists the failing cases when ids differ or scores differ beyond fp32 tolerance.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running"
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import topk_reference as ref  # noqa: E402

from text4vpr.kernels.group_topk_triton import group_topk_triton  # noqa: E402
from text4vpr.kernels.common import MODES  # noqa: E402
from text4vpr.kernels.topk import group_topk, group_topk_torch  # noqa: E402


def cases():
    """(name, kwargs for random_case, k, kernel options)."""
    for mode in MODES:
        for partial in (False, True):
            for k in (1, 10, 128) if partial else (1, 10):  # k = 128 (the kernel's largest) costs the most: once
                yield mode, dict(num_q=13, n=300, v=4, d=8, partial=partial), k, dict(splits=3)
        yield mode, dict(num_q=16, n=150, v=4, d=5, partial=True), 17, dict(block_k=16)  # uneven V*D
        yield mode, dict(num_q=5, n=40, v=4, d=8, partial=True, ties=True), 33, dict(splits=2)
        yield mode, dict(num_q=3, n=9, v=4, d=4, partial=False), 16, {}  # k > N
    for k in (2, 7, 64, 100):
        yield "upstream", dict(num_q=7, n=260, v=4, d=8, partial=True), k, dict(splits=1 + k % 3)


def main() -> int:
    failures = []
    for mode, case, k, opts in cases():
        seed = zlib.crc32(f"{mode}{sorted(case.items())}{k}".encode())
        q, qm, d, dm = ref.random_case(seed, **case)
        s_t, i_t = group_topk_triton(q, qm, d, dm, k, mode, **opts)
        s_r, i_r = group_topk_torch(q, qm, d, dm, k, mode)
        same_ids = torch.equal(i_t, i_r)
        close = torch.allclose(s_t, s_r, rtol=1e-5, atol=1e-5)
        print(f"{mode:12s} {case} k={k} {opts}: ids {'ok' if same_ids else 'DIFFER'}, scores {'ok' if close else 'DIFFER'}")
        if not (same_ids and close):
            failures.append((mode, case, k))
    # dispatch: backend="triton" with k above the kernel's limit falls back to torch
    q, qm, d, dm = ref.random_case(7, 4, 200, 4, 8, True)
    s, i = group_topk(q, qm, d, dm, 150, "cosine", backend="triton")
    if not torch.equal(i, group_topk_torch(q, qm, d, dm, 150, "cosine")[1]):
        failures.append(("fallback", {}, 150))
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
