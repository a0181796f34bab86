"""Helper for test_distributed.py: run under `torchrun --nproc_per_node 2` (gloo, CPU).

Checks the collectives with gradients against what one process computes on the whole
data, and that a multi-rank forward and backward through them (the loss, the global
BatchNorm) emits no deprecation warning. Writes ok-<rank> when every check passed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from text4vpr.losses import ContrastiveLoss
from text4vpr.models.sync_batchnorm import GlobalBatchNorm1d
from text4vpr.utils.distributed import all_reduce_sum, exit_process, gather_rows, gather_sizes, shutdown_distributed

SIZES = (3, 5)  # unequal rows per rank


def data(seed: int) -> torch.Tensor:
    """(8, 4) rows shared by every rank; rank r owns rows sum(SIZES[:r]) .. + SIZES[r]."""
    return torch.randn(sum(SIZES), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mine(x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return x[start : start + SIZES[rank]]


def check_gather(rank: int) -> None:
    full, weights = data(0), data(1)
    x = mine(full, rank).clone().requires_grad_()
    sizes = gather_sizes(x.shape[0], x.device, 2)
    assert sizes == list(SIZES), sizes
    out = gather_rows(x, sizes, rank)
    assert torch.equal(out, full)
    (out * weights * (rank + 1)).sum().backward()  # each rank's own loss; grads summed over ranks
    assert torch.allclose(x.grad, mine(weights, rank) * 3), "gather_rows gradient"


def check_all_reduce(rank: int) -> None:
    x = mine(data(2), rank).sum(0).clone().requires_grad_()  # (4,)
    out = all_reduce_sum(x)
    assert torch.allclose(out, data(2).sum(0))
    (out * (rank + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0)), "all_reduce_sum gradient"


def check_no_deprecation(rank: int) -> None:
    bn = GlobalBatchNorm1d(4).train()
    loss_fn = ContrastiveLoss(learnable=True, tiled=True, block_size=2)
    x = mine(data(3), rank).float().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_fn(bn(x), mine(data(4), rank).float())
        loss.backward()
    bad = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
           or "deprecat" in str(w.message).lower()]
    assert not bad, bad


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    check_gather(rank)
    check_all_reduce(rank)
    check_no_deprecation(rank)
    Path(out_dir, f"ok-{rank}").write_text("ok\n")
    shutdown_distributed()


if __name__ == "__main__":
    exit_process(main(sys.argv[1]) or 0)
