"""Run by test_approx_index.py under `torchrun --nproc_per_node 2` (gloo, CPU): each rank writes
its part and builds its FAISS file; each then searches its own part and one gather merges.
The sharded answer must equal a single process searching both parts, on both ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from text4vpr.kernels.topk import group_topk
from text4vpr.retrieval.approx_build import build_approximate
from text4vpr.retrieval.approx_index import ApproxConfig
from text4vpr.retrieval.approx_load import load_approx_index, load_search_index
from text4vpr.retrieval.approx_search import approx_topk, sharded_approx_topk
from text4vpr.retrieval.index import write_header, write_part
from text4vpr.utils.distributed import exit_process, shutdown_distributed


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(5)
    n, cut = 500, 180
    emb = torch.nn.functional.normalize(torch.randn(n, 4, 16, generator=g), dim=-1)
    mask = torch.rand(n, 4, generator=g) > 0.1
    q, qm = 4 * torch.randn(20, 4, 16, generator=g), torch.rand(20, 4, generator=g) > 0.3
    qm[:, 2] = True
    path = Path.cwd() / "idx"
    lo, hi = (0, cut) if rank == 0 else (cut, n)
    write_part(path, rank, {"embeddings": emb[lo:hi], "view_mask": mask[lo:hi], "coords": torch.zeros(hi - lo, 3,
               dtype=torch.float64), "index": torch.arange(lo, hi)}, "hash")
    dist.barrier()
    if rank == 0:
        write_header(path, "hash", 16, 4, "float32", [cut, n - cut])
    dist.barrier()
    header = build_approximate(path, ApproxConfig(nprobe=10**6, rerank=60))  # a full graph search
    verdicts = {"files": [f["part"] for f in header["approximate"]["files"]] == [0, 1]}
    mine = load_search_index(path)  # under torch.distributed: this rank's part only
    whole = load_approx_index(path)
    for mode in ("upstream", "cosine", "any-heading"):
        s, i = sharded_approx_topk(mine, q, qm, 10, mode)
        s_one, i_one = approx_topk(whole, q, qm, 10, mode)
        _, i_exact = group_topk(q, qm, emb, mask, 10, mode)
        verdicts[mode] = len(mine.parts) == 1 and torch.equal(i, i_one) and torch.equal(s, s_one) and torch.equal(i, i_exact)
    shutdown_distributed()
    print("\n".join(f"rank {rank} {name}: {'ok' if good else 'DIFFER'}" for name, good in verdicts.items()), flush=True)
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    exit_process(main() or 0)
