"""Leaving a torch.distributed run cleanly."""

from __future__ import annotations


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group, so that every rank tears down together.

    Rank 0 usually finishes last (it writes the reports); left alone in teardown after its
    peers have exited, a gloo rank was seen to abort (SIGABRT, "terminate called without an
    active exception") at interpreter exit, turning a finished run into a failed job.
    No-op when no process group is initialised.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
