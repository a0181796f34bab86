"""A run's global batch G, kept across resumes on any number of ranks.

A fresh run's G is `data.loader.batch_size` x ranks; its checkpoints store G and the global
position (epoch, global batch index). A resume on M ranks takes G / M locations per rank
(M must divide G; refused naming the valid counts otherwise), so it continues at the next
global batch of the same order (docs/data.md#elastic-order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from text4vpr.config import ConfigError
from text4vpr.data.loader import LoaderConfig
from text4vpr.data.order import per_rank_batch
from text4vpr.train import checkpoint as ckpt


def resumed_loader(saved: dict | None, cfg: LoaderConfig, world: int, say: Callable[[str], None]) -> LoaderConfig:
    """The loader settings of this run: per-rank batch G / world, with G as the checkpoint saved it."""
    if not saved or not saved.get("global_batch"):
        return cfg  # a fresh run, or a checkpoint from before G was stored: the config's batch
    g, was = int(saved["global_batch"]), int(saved.get("world_size") or 0)
    if cfg.fixed_shard_assignment and was and was != world:
        raise ConfigError(f"data.loader.fixed_shard_assignment=true: the saved run's order belongs to {was} rank(s), "
                          f"not {world}; resume on {was} ranks, or set it false for the elastic order")
    per = per_rank_batch(g, world)
    if per != cfg.batch_size:
        say(f"resuming on {world} rank(s): the run's global batch of {g} locations is {per} per rank "
            f"(data.loader.batch_size={cfg.batch_size} is ignored; it was {g // max(was, 1)} on {was or '?'} rank(s))")
    return dataclasses.replace(cfg, batch_size=per)


def run_shape(cfg: LoaderConfig, world: int) -> dict:
    """What a checkpoint records of the run's shape: the global batch G and the world size."""
    return {"global_batch": cfg.batch_size * world, "world_size": world}


def resume_point(resume: str, ckpt_dir, cfg: LoaderConfig, acc) -> tuple[Path | None, LoaderConfig]:
    """The checkpoint to resume (verified; None: a fresh run) and this run's loader settings: the
    run's global batch on this world size (`acc`: the Accelerator, for the world size and messages)."""
    path = ckpt.resolve_resume(resume, ckpt_dir, report=acc.print)
    saved = ckpt.read_verified_state(path, verified=True) if path else None
    return path, resumed_loader(saved, cfg, acc.num_processes, acc.print)


def log_locations(log, step: int, index: list[int], world: int, enabled: bool) -> None:
    """With `train.log_locations`: a "batch" record of the step's global batch, every rank's location ids
    in rank order (a collective: every rank calls it)."""
    if not enabled:
        return
    if world > 1:
        from accelerate.utils import gather_object

        index = gather_object(list(index))
    log.log("batch", step, locations=list(index))
