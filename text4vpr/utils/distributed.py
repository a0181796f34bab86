"""torch.distributed helpers: who am I, collectives with gradients (for the loss and the
global BatchNorm), averaging gradients by hand, leaving a run cleanly."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from text4vpr.utils.errors import InputError, one_line


class PeerInputError(InputError, RuntimeError):
    """An input error that another rank met (its one-line message), raised on this rank too."""


def raise_together(error: BaseException | None, counts: Sequence[int] = ()) -> list[int]:
    """Raise on every rank when any rank holds `error` (this rank's own, else the first other
    rank's message), else return `counts` summed over the ranks. A rank raising alone would
    leave the others waiting in their next collective (until a watchdog fires)."""
    if distributed_world()[1] == 1:
        if error is not None:
            raise error
        return list(counts)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([int(error is not None), *counts], dtype=torch.int64, device=device)
    dist.all_reduce(flags)
    if int(flags[0]) == 0:
        return flags[1:].tolist()
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else one_line(error))
    if error is not None:
        raise error
    raise PeerInputError(next(m for m in messages if m))


class Deferred:
    """Iterates `items`, stopping at an InputError instead of raising it; `settle()` (called on
    every rank after the loop) then raises it on every rank (`raise_together`)."""

    def __init__(self, items):
        self.items, self.error = items, None

    def __iter__(self):
        try:
            yield from self.items
        except InputError as e:
            self.error = e

    def settle(self) -> None:
        raise_together(self.error)


def shutdown_distributed() -> bool:
    """Barrier, then destroy the process group, so that every rank tears down together.
    Returns whether there was a group (no-op otherwise).

    Rank 0 usually finishes last (it writes the reports); left alone in teardown after its
    peers have exited, a gloo rank was seen to abort at interpreter exit.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def leave(rc: int) -> int:
    """End an entry point: after a success, every rank leaves together (barrier); after an
    error (which every rank raised together, `raise_together`), at once, with no teardown
    beside peers that are leaving too. Returns `rc` when not distributed."""
    if rc == 0 and shutdown_distributed():
        exit_process(0)
    if rc != 0 and distributed_world()[1] > 1:
        exit_process(rc)
    return rc


def exit_process(code: int) -> None:
    """Flush logs and standard streams, then `os._exit(code)`: a distributed process skips the
    interpreter's and C++'s exit-time teardown, where a gloo rank occasionally aborts (SIGABRT,
    "terminate called without an active exception") even after a completed
    `destroy_process_group`; about 1 in 30 two-rank eval runs here, 0 in 30 with this exit."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def average_gradients(parameters, bucket_numel: int = 1 << 25) -> None:
    """Mean of every parameter's `.grad` over all ranks, in flat per-dtype buckets: DDP's
    gradient reduction, for steps whose backward passes all ran under `no_sync`.

    A parameter without a gradient counts as zeros (as in DDP), so every rank reduces the
    same buckets. No-op when not distributed.
    """
    if distributed_world()[1] == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    _flat_collective([p.grad for p in params], bucket_numel, lambda flat: (dist.all_reduce(flat), flat.div_(world)))


def broadcast_buffers(module, src: int = 0, bucket_numel: int = 1 << 25) -> None:
    """Every buffer (BatchNorm running statistics, ...) from rank `src` to all ranks, in flat
    buckets: what DDP does before each synced forward, for steps that run under `no_sync`
    only. No-op when not distributed."""

    if distributed_world()[1] == 1:
        return
    _flat_collective([b.data for b in module.buffers()], bucket_numel, lambda flat: dist.broadcast(flat, src))


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not initialised."""

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flat_collective(tensors: list, bucket_numel: int, collective) -> None:
    """Run `collective(flat)` in place on each flat bucket of `tensors`, then copy the results back."""

    for bucket in _buckets(tensors, bucket_numel):
        flat = torch.cat([t.reshape(-1) for t in bucket])  # (sum numel,)
        collective(flat)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def _buckets(grads: list, bucket_numel: int) -> list[list]:
    """Consecutive groups of same-dtype, same-device tensors of at most `bucket_numel` elements (or one)."""
    out, size = [], 0
    for g in grads:
        last = out[-1] if out else None
        if last is None or size + g.numel() > bucket_numel or (g.dtype, g.device) != (last[0].dtype, last[0].device):
            out.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return out


# ---------------------------------------------------------------------- collectives with gradients
def gather_sizes(n: int, device: torch.device, world: int) -> list[int]:
    """Every rank's row count (`[n]` with one process, no communication)."""
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Concatenation of every rank's (n_r, ...) rows (`sizes` from `gather_sizes`), in rank
    order. Gradients flow back to each row's owner (summed over the ranks' losses). With
    one process this is `x` itself."""
    if len(sizes) == 1:
        return x
    return _GatherRows.apply(x, sizes, rank)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather wants equal shapes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])  # (sum sizes, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        grad = grad.contiguous().clone()  # never reduce autograd's incoming buffer in place
        if dist.get_backend() == "nccl" and len(set(sizes)) == 1:
            out = grad.new_empty((sizes[rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out, None, None
        dist.all_reduce(grad)  # gloo has no reduce_scatter
        start = sum(sizes[:rank])
        return grad[start : start + sizes[rank]], None, None


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks, as a new tensor; the gradient reaching each rank's `x` is the
    sum of every rank's gradient of the result. (torch.distributed.nn's version is deprecated.)"""
    return _AllReduceSum.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum(grad)


def average_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    """Identity whose backward averages the gradient over the `world` ranks (a parameter every
    rank uses, such as a shared temperature). `x` itself when world is 1."""
    return x if world == 1 else _AverageGrad.apply(x)


class _AverageGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum(grad) / dist.get_world_size()


def main_value(value):
    """Rank 0's `value` (any picklable object) on every rank of the process group."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
