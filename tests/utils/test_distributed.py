"""Hand-made gradient averaging: bucket layout, and a no-op outside a process group.
(Its multi-rank result is checked by tests/train/test_distributed_train.py.)"""

from pathlib import Path

import pytest
import torch

from text4vpr.utils.distributed import _buckets, average_grad, average_gradients, gather_rows, gather_sizes
from tests.helpers import run_torchrun


def test_buckets_keep_order_split_on_size_and_dtype():
    ts = [torch.zeros(3), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(9), torch.zeros(1)]
    groups = _buckets(ts, bucket_numel=8)
    assert [[t.numel() for t in g] for g in groups] == [[3, 4], [2], [9], [1]]
    flat = [t for g in groups for t in g]
    assert len(flat) == len(ts) and all(a is b for a, b in zip(flat, ts))  # every tensor once, in order


def test_average_gradients_is_a_no_op_without_a_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


@pytest.mark.slow
def test_collectives_with_gradients_two_ranks(tmp_path):
    """torchrun 2 CPU ranks: gather_rows / all_reduce_sum values and gradients equal one
    process's, and the loss and global BatchNorm emit no deprecation warning."""
    proc = run_torchrun(Path(__file__).parent / "dist_collectives_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"ok-{rank}").read_text().strip() == "ok"


def test_helpers_are_identities_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_sizes(3, x.device, 1) == [3]
    assert gather_rows(x, [3], 0) is x and average_grad(x, 1) is x
