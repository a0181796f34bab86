"""WebDataset loader: shards -> batch dicts, split exactly across ranks and workers.

The public entry point: `LoaderConfig`, `build_loader`, `batches_per_epoch`,
`dataset_size`, `LoaderError`. The loader does its own rank/worker split (do not pass it to
Accelerate's `prepare()`). Its parts: `partition` (which slot reads what), `decode`
(samples -> batch dicts), `stream` (the IterableDataset), `loader_config` (settings).
Errors name the shard and sample key; `on_error="skip"` counts and logs instead of raising.
"""

from __future__ import annotations

import atexit
import os

import torch
from torch.utils.data import DataLoader

from text4vpr.data.loader_config import LoaderConfig, LoaderError
from text4vpr.data.partition import batches_per_epoch, dataset_size, default_world
from text4vpr.data.stream import ShardStream

__all__ = ["LoaderConfig", "LoaderError", "batches_per_epoch", "build_loader", "dataset_size"]


def build_loader(
    cfg: LoaderConfig,
    mode: str = "train",
    *,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    skip_images: frozenset[int] = frozenset(),
) -> DataLoader:
    """A DataLoader of batch dicts for one epoch (train) or one full pass (eval).

    Make a new one each epoch. `len()` is the number of batches this rank yields. Resume
    mid-epoch with `start_batch`, a global batch index: any world size and num_workers with the
    same global batch (batch_size x world); with fixed_shard_assignment, the same world and workers.
    Locations in `skip_images` are not decoded: their images are placeholders (zero pixels;
    under image_dtype="float32" those zeros normalised), their view masks and descriptions
    unchanged. For a trainer whose frozen-trunk cache holds them and never reads the images.
    """
    rank, world_size = default_world(rank, world_size)
    dataset = ShardStream(cfg, mode, epoch, rank, world_size, start_batch, skip_images)
    if cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_leave_signals_to_main if cfg.num_workers > 0 else None,
        # own generator: creating the iterator must not consume the global torch RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed + 1_000_003 * epoch),
    )


def _leave_signals_to_main(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM (a launcher or terminal signals the whole process group):
    the main process decides when to stop (e.g. after a checkpoint) and its workers follow it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_leaked_workers() -> None:
    """At exit, kill the daemonic children still alive (DataLoader workers of iterators nobody
    closed). Python's own exit handler terminates them too, but with SIGTERM, which our workers
    ignore: it would then wait for them forever."""
    import multiprocessing

    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join()


atexit.register(_kill_leaked_workers)  # after multiprocessing's own (torch imported it): runs before it
