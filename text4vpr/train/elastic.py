"""A run's global batch G, kept across resumes on any number of ranks.

A fresh run's G is `data.loader.batch_size` x ranks; its checkpoints store G and the global
position (epoch, global batch index). A resume on M ranks takes G / M locations per rank
(M must divide G; refused naming the valid counts otherwise), so it continues at the next
global batch of the same order (docs/data.md#elastic-order).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from text4vpr.config import ConfigError
from text4vpr.data.loader import LoaderConfig
from text4vpr.data.order import per_rank_batch


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


def global_locations(index: list[int], world: int) -> list[int]:
    """The step's global batch: every rank's location ids, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return list(index)
    from accelerate.utils import gather_object

    return list(gather_object(list(index)))
