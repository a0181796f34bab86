"""Hand-made gradient averaging: bucket layout, and a no-op outside a process group.
(Its multi-rank result is checked by tests/train/test_distributed_train.py.)"""

import torch

from text4vpr.utils.distributed import _buckets, average_gradients


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
