"""Run by test_sharded_search.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every case splits one random database unequally (one rank empty in some) and checks that the
sharded answer equals single-process `group_topk` exactly, on both ranks.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from text4vpr.kernels.topk import group_topk
from text4vpr.retrieval.search import broadcast_queries, sharded_group_topk
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = 0
    for case, (n, split, k, mode) in enumerate(
        [(200, 70, 10, "upstream"), (200, 0, 10, "cosine"), (200, 200, 25, "any-heading"),
         (31, 5, 40, "upstream"), (150, 149, 1, "cosine"), (64, 32, 64, "upstream")]
    ):
        g = torch.Generator().manual_seed(100 + case)
        queries = torch.randint(-2, 3, (9, 4, 16), generator=g).float()  # exact scores
        qmask = torch.rand(9, 4, generator=g) < 0.7
        qmask[:, 0] = True
        db = torch.randint(-2, 3, (n, 4, 16), generator=g).float()  # exact ties across ranks
        db[n // 2 :] = db[: n - n // 2].clone()
        dmask = torch.rand(n, 4, generator=g) < 0.9
        bounds = [(0, split), (split, n)]
        lo, hi = bounds[rank] if world == 2 else (0, n)
        q, qm = broadcast_queries(queries if rank == 0 else None, qmask if rank == 0 else None)
        s, i = sharded_group_topk(q, qm, db[lo:hi], dmask[lo:hi], k, mode, id_offset=lo, total=n)
        s_ref, i_ref = group_topk(queries, qmask, db, dmask, k, mode)
        ok = torch.equal(i, i_ref) and torch.equal(s, s_ref)
        print(f"rank {rank} case {case} n={n} split={split} k={k} {mode}: {'ok' if ok else 'DIFFER'}", flush=True)
        failures += not ok
    shutdown_distributed()
    return 1 if failures else 0


if __name__ == "__main__":
    exit_process(main() or 0)
