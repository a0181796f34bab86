"""Which shards and samples each (rank, worker) slot reads, and in what order.

Pure bookkeeping (no decoding): shard list and counts from the manifest, batches per epoch,
the resume arithmetic of `worker_batch_range`, per-pass shard orders and the buffer shuffle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from text4vpr.utils.distributed import distributed_world
from text4vpr.data.loader_config import LoaderConfig, LoaderError
from text4vpr.data.remote import is_url, read_all
from text4vpr.data.shard_reader import MANIFEST, is_shard_dir, load_manifest, member, parse_manifest
from text4vpr.data.sample_key import split_name


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, from the manifest
    entries: tuple[dict, ...] | None = None  # the manifest's record per shard (sha256, bytes, keys)
    resize: int | None = None  # the build's --resize: every image is resize x resize
    splits: frozenset[str] | None = None  # the splits the build wrote


def resolve_shards(cfg: LoaderConfig) -> ShardSet:
    """Shard URLs and (when a manifest is available) their manifest records; with
    `cfg.verify`, a manifest is required and no location key may sit in two shards."""
    folder = bool(cfg.shards) and is_shard_dir(cfg.shards)
    if folder:
        manifest = load_manifest(cfg.shards)
        urls = tuple(member(cfg.shards, s["name"]) for s in manifest["shards"])
    else:
        from webdataset.shardlists import expand_urls

        urls = tuple(expand_urls(cfg.shards)) if cfg.shards else ()
        if not urls:
            raise LoaderError(f"no shards found for {cfg.shards!r} (a folder needs {MANIFEST})")
        if cfg.manifest is None:
            if cfg.verify:
                raise LoaderError(f"{cfg.shards}: cannot verify shards without a manifest: give LoaderConfig.manifest, "
                                  "or verify=False to read them unchecked")
            return ShardSet(urls, None)
        manifest = parse_manifest(read_all(cfg.manifest) if is_url(cfg.manifest) else Path(cfg.manifest).read_bytes(),
                                  str(cfg.manifest))
    by_name = {s["name"]: s for s in manifest["shards"]}
    missing = [u for u in urls if os.path.basename(u) not in by_name]
    if missing:
        raise LoaderError(f"{cfg.manifest or MANIFEST}: no entry for shard(s) {missing[:3]}")
    entries = tuple(by_name[os.path.basename(u)] for u in urls)
    if cfg.verify:
        _check_unique_keys(entries)
    return ShardSet(urls, tuple(e["count"] for e in entries), entries, manifest.get("options", {}).get("resize"),
                    frozenset(split_name(x) for x in manifest.get("inputs", {}).get("xlsx", [])) or None)


def _check_unique_keys(entries: tuple[dict, ...]) -> None:
    """A location key listed by two shards (a shard copied over another) is an error."""
    owner: dict[str, str] = {}
    for e in entries:
        for key in e.get("keys", ()):
            if key in owner:
                raise LoaderError(f"{e['name']}: duplicate location key {key} (also in {owner[key]}): "
                                  "a shard copied over another? rebuild the folder")
            owner[key] = e["name"]


def dataset_size(cfg: LoaderConfig) -> int:
    """Number of locations in the shards (needs a manifest)."""
    shards = resolve_shards(cfg)
    if shards.counts is None:
        raise LoaderError("sample counts unknown: give a shard folder or LoaderConfig.manifest")
    return sum(shards.counts)


def default_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: explicit, else torch.distributed's (`distributed_world`), else (0, 1)."""
    group_rank, group_world = distributed_world()
    world_size = group_world if world_size is None else world_size
    rank = group_rank if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def batches_per_epoch(cfg: LoaderConfig, world_size: int | None = None) -> int:
    """Train-mode batches each rank yields per epoch: locations // (world_size * batch_size)."""
    _, world = default_world(0, world_size)
    if cfg.batches_per_epoch is not None:
        if not cfg.fixed_shard_assignment:  # the elastic order holds only N // G full global batches
            _check_override(cfg.batches_per_epoch, dataset_size(cfg), world * cfg.batch_size)
        return cfg.batches_per_epoch
    n = dataset_size(cfg)
    steps = n // (world * cfg.batch_size)
    if steps < 1:
        raise LoaderError(f"{n} locations cannot fill one batch of {cfg.batch_size} on each of {world} ranks")
    return steps


def _check_override(wanted: int, total: int, global_batch: int) -> None:
    if wanted > total // global_batch:  # past them a rank's share is short, then empty
        raise LoaderError(f"data.loader.batches_per_epoch={wanted}: {total} locations hold {total // global_batch} "
                          f"full global batches of {global_batch}; lower it, or leave it unset")


def worker_batch_range(total: int, start: int, num_workers: int, physical: int) -> tuple[int, int, int]:
    """(logical worker, first, end) local batch indices for a DataLoader worker.

    Global batch j comes from logical worker j % W as its local batch j // W. Physical
    worker p plays logical worker (p + start) % W, because the DataLoader always starts its
    round robin at worker 0: so a resumed epoch yields global batches start, start+1, ...
    """
    w = num_workers
    logical = (physical + start) % w
    end = total // w + (1 if logical < total % w else 0)
    first = max(0, -(-(start - logical) // w))  # ceil((start - logical) / W): batches before `start`
    return logical, min(first, end), end


def slot_shards(order: list[int], slot: int, slots: int) -> tuple[list[int], bool]:
    """Shards a slot reads, and whether it must take every slots-th sample of them."""
    if len(order) >= slots:
        return order[slot::slots], False
    return order, True


def slot_count(counts: tuple[int, ...], slot: int, slots: int) -> int:
    """Samples one slot yields in an eval pass over shards with these counts."""
    mine, by_sample = slot_shards(list(range(len(counts))), slot, slots)
    if not by_sample:
        return sum(counts[s] for s in mine)
    total = sum(counts)
    return total // slots + (1 if slot < total % slots else 0)


def pass_order(n: int, slot: int, slots: int, seed: int, epoch: int, cycle: int, fixed_assignment: bool) -> list[int]:
    """Shard order of one train pass: a new permutation per (epoch, pass); with
    `fixed_assignment`, a fixed shard -> slot map whose slot entries are permuted."""
    fresh = np.random.default_rng([seed, epoch, cycle, 2]).permutation(n)
    if not fixed_assignment:
        return fresh.tolist()
    fixed = np.random.default_rng([seed, 3]).permutation(n)
    if n < slots:  # slots take every slots-th sample: a fixed reading order keeps that fixed too
        return fixed.tolist()
    mine = fixed[slot::slots]  # this slot's shards, the same every epoch
    fixed[slot::slots] = mine[fresh[fresh < len(mine)]]  # ... read in a new order each pass
    return fixed.tolist()


def shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffle: fill `size` items, then emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]
