"""The elastic train order: an epoch's global sequence of samples from (seed, epoch, manifest) alone.

The shard order is shuffled, then the samples of each window of `window` consecutive shards
(in that order) are shuffled together. Global batch j is the j-th run of G samples of the
sequence (the tail short of a full batch is dropped); rank r of a world of size R takes its
r-th contiguous share of G / R. Nothing here depends on the world size or the DataLoader
workers, so any number of ranks and workers makes the same global batches, and a resume
needs only (epoch, global batch index). See docs/data.md#elastic-order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from text4vpr.data.loader_config import LoaderError


def epoch_order(counts: Sequence[int], seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, sample-within-shard) of every sample of the epoch, in order: two (N,) int64 arrays."""
    if window < 1:
        raise ValueError(f"shuffle_window must be >= 1 shard, got {window}")
    rng = np.random.default_rng([seed, epoch, 7])
    shards = rng.permutation(len(counts))
    out_shard, out_sample = [], []
    for w0 in range(0, len(shards), window):
        group = shards[w0:w0 + window]
        s = np.concatenate([np.full(counts[g], g, dtype=np.int64) for g in group])
        i = np.concatenate([np.arange(counts[g], dtype=np.int64) for g in group])
        perm = rng.permutation(len(s))  # samples of the window, mixed across its shards
        out_shard.append(s[perm])
        out_sample.append(i[perm])
    if not out_shard:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_shard), np.concatenate(out_sample)


def per_rank_batch(global_batch: int, world: int) -> int:
    """G / R, or a refusal naming the world sizes that divide G."""
    if global_batch % world:
        valid = [m for m in range(1, global_batch + 1) if global_batch % m == 0]
        raise LoaderError(f"a global batch of {global_batch} locations cannot be split over {world} ranks; "
                          f"run on {', '.join(map(str, valid))} ranks (or change data.loader.batch_size and start anew)")
    return global_batch // world


def global_batches(total: int, global_batch: int) -> int:
    """Full global batches per epoch: total // G (at least one, or an error)."""
    if total < global_batch:
        raise LoaderError(f"{total} locations cannot fill one global batch of {global_batch}")
    return total // global_batch


def rank_share(j: int, rank: int, world: int, global_batch: int) -> slice:
    """Positions in the epoch's sequence of rank `rank`'s part of global batch j."""
    per = global_batch // world
    start = j * global_batch + rank * per
    return slice(start, start + per)
