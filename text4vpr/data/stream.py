"""The loader's IterableDataset: reads this (rank, worker) slot's samples and yields batches.

- train (default): the elastic order (`order`, `elastic`): global batch j is the same G
  locations for any world size and num_workers; this rank reads only its share of each, by
  byte range. Every rank yields exactly `batches_per_epoch` batches, so uneven shards never
  hang DDP; `start_batch=n` yields exactly the global batches n, n+1, ...
- train with `fixed_shard_assignment`: each (rank, worker) slot streams its own shards,
  endlessly, through a shuffle buffer seeded by (seed, epoch, rank, worker); `start_batch`
  resumes exactly only with the same world size and num_workers.
- eval: no shuffle, every location exactly once across all ranks x workers, last batch of
  each worker partial, nothing padded or repeated.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from text4vpr.data.decode import BatchMaker, Stats, log
from text4vpr.data.elastic import ElasticBatches, check_offsets
from text4vpr.data.loader_config import LoaderConfig, LoaderError
from text4vpr.data.partition import (
    batches_per_epoch,
    pass_order,
    resolve_shards,
    shuffle,
    slot_count,
    slot_shards,
    worker_batch_range,
)
from text4vpr.data.sample_key import member_key
from text4vpr.data.fetch import DigestMismatch
from text4vpr.data.remote import RemoteReadError, is_url
from text4vpr.data.shard_reader import iter_tar_samples
from text4vpr.utils.hashing import bytes_sha256


class _Unverified(Exception):
    """A shard whose bytes do not match its manifest checksum (message names it)."""


class ShardStream(IterableDataset):
    """Yields ready batch dicts; one instance per (mode, epoch, rank, start_batch)."""

    def __init__(self, cfg: LoaderConfig, mode: str, epoch: int, rank: int, world_size: int, start_batch: int = 0,
                 skip_images: frozenset[int] = frozenset()):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        cfg.check()
        self.cfg, self.mode, self.epoch = cfg, mode, epoch
        self.rank, self.world = rank, world_size
        self.shards = resolve_shards(cfg)
        self.start_batch = start_batch
        self.total = batches_per_epoch(cfg, world_size) if mode == "train" else None
        if mode == "train" and not 0 <= start_batch <= self.total:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.total}")
        self.stats = Stats(cfg.on_error)
        expect = {"resize": self.shards.resize, "splits": self.shards.splits} if cfg.verify else {}
        self.maker = BatchMaker(cfg, self.stats, skip_images, **expect)
        self.fetcher = cfg.fetcher()  # shards at URLs: verified, cached, read ahead
        self.elastic = None  # train: the elastic order, unless each rank keeps its own shards
        if mode == "train" and not cfg.fixed_shard_assignment:
            check_offsets(self.shards, cfg.shards)
            self.elastic = ElasticBatches(self.shards, self.maker, self.stats, cfg.seed, epoch, cfg.shuffle_window,
                                          rank, world_size, cfg.batch_size, cfg.verify, self.fetcher)

    def __len__(self) -> int:
        """Batches this rank yields (train: exact; eval: exact when the manifest is known)."""
        if self.mode == "train":
            return self.total - self.start_batch
        if self.shards.counts is None:
            raise TypeError("eval length unknown without a manifest")
        w = max(1, self.cfg.num_workers)
        slots = self.world * w
        return sum(-(-slot_count(self.shards.counts, self.rank * w + p, slots) // self.cfg.batch_size) for p in range(w))

    # ---- raw samples -------------------------------------------------------------------
    def _open(self, url: str, entry: dict | None, fetched=None):
        """The shard as a stream; with `verify`, read whole and checked against its sha256 first.
        `fetched`: the future of its bytes from a URL (`_fetch_ahead`), checked there."""
        from webdataset import gopen

        if fetched is not None:
            try:
                data = fetched.result()
            except DigestMismatch as e:
                raise _Unverified(str(e)) from None
        elif not self.cfg.verify or entry is None:
            return gopen(url, "rb")
        else:
            with gopen(url, "rb") as stream:
                data = stream.read()
        if fetched is None and bytes_sha256(data) != entry["sha256"]:
            raise _Unverified(f"{url}: sha256 does not match its manifest entry (a changed, damaged or replaced shard; "
                              "rebuild it, or verify=False to read it unchecked)")
        if self.cfg.verify and "keys" in entry and _member_keys(data) != list(entry["keys"]):
            raise _Unverified(f"{url}: its location keys differ from its manifest entry's list (a crafted or "
                              "mismatched manifest; rebuild the folder)")
        return io.BytesIO(data)

    def _fetch_ahead(self, shards: list[int]) -> Iterator:
        """Futures of the bytes of these shards when they are at URLs with manifest records
        (up to `remote_in_flight` reads running ahead of the decoder), else Nones."""
        if not (self.shards.entries and shards and is_url(self.shards.urls[shards[0]])):
            return iter([None] * len(shards))
        # whole shards today; per-sample byte ranges (manifest offsets) are reads of the same kind
        return self.fetcher.ahead((self.shards.urls[s], 0, self.shards.entries[s]["bytes"],
                                   self.shards.entries[s]["sha256"] if self.cfg.verify else None) for s in shards)

    def _read_shard(self, s: int, report: bool = True, fetched=None) -> Iterator[tuple[str, str, dict]]:
        """(shard, key, {suffix: bytes}) per sample of shard s; a checksum mismatch or truncation
        is an error or a counted skip. `report=False`: another slot reads this shard too and
        counts its loss (skip mode)."""
        url = self.shards.urls[s]
        expected = self.shards.counts[s] if self.shards.counts else None
        key, n = None, 0
        try:
            with self._open(url, self.shards.entries[s] if self.shards.entries else None, fetched) as stream:
                for key, sample in iter_tar_samples(stream, url):
                    yield url, key, sample
                    n += 1
        except (_Unverified, RemoteReadError) as e:  # the message names the URL
            if report or self.cfg.on_error == "raise":
                self.stats.fail(str(e), lost=expected if expected is not None else 1)
            return
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, gopen errors
            if not report and self.cfg.on_error == "skip":
                return
            self.stats.fail(f"{url}: corrupt or truncated tar after sample {n} (last good key {key}): {type(e).__name__}: {e}",
                            lost=(expected - n) if expected is not None else 1, truncated=True)
            return
        if expected is not None and n != expected and (report or self.cfg.on_error == "raise"):
            self.stats.fail(f"{url}: {n} samples, manifest says {expected} (truncated?)", lost=max(expected - n, 0), truncated=True)

    def _slot_samples(self, order: list[int], slot: int, slots: int) -> Iterator[tuple[str, str, dict]]:
        mine, by_sample = slot_shards(order, slot, slots)
        i = 0
        for s, fetched in zip(mine, self._fetch_ahead(mine)):
            owner = not by_sample or s % slots == slot  # with fewer shards than slots, one slot counts a shard's loss
            for item in self._read_shard(s, owner, fetched):
                if not by_sample or i % slots == slot:
                    yield item
                i += 1

    def _train_samples(self, slot: int, slots: int, logical: int) -> Iterator[tuple[str, str, dict]]:
        """Endless shuffled stream for one slot: new shard order every pass, seeded per epoch."""
        n, cycle, cfg = len(self.shards.urls), 0, self.cfg
        buffer_rng = np.random.default_rng([cfg.seed, self.epoch, self.rank, logical, 1])

        while True:  # one pass over the slot's shards per cycle; the buffer empties between passes
            order = pass_order(n, slot, slots, cfg.seed, self.epoch, cycle, cfg.fixed_shard_assignment)
            got = 0
            for item in shuffle(self._slot_samples(order, slot, slots), cfg.shuffle_buffer, buffer_rng):
                got += 1
                yield item
            if got == 0:
                raise LoaderError(f"slot {slot} of {slots} got no samples from {n} shards")
            cycle += 1

    # ---- batches -----------------------------------------------------------------------
    def _batches(self, raw: Iterator, limit: int | None) -> Iterator[dict]:
        """Decode raw samples into full batches (train: exactly `limit`); eval keeps the partial tail."""
        items, made, self._counted = [], 0, self.stats.samples_skipped
        for url, key, sample in raw:
            if limit is not None and made >= limit:
                return
            item = self.maker.decode(url, key, sample)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.cfg.batch_size:
                yield self._collate(items)
                items, made = [], made + 1
        if items and self.mode == "eval":
            yield self._collate(items)

    def _collate(self, items: list[dict]) -> dict:
        """The batch, with the samples skipped since this worker's previous batch (`skipped`)."""
        batch = self.maker.collate(items)
        batch["skipped"] = torch.tensor(self.stats.samples_skipped - self._counted, dtype=torch.int64)
        self._counted = self.stats.samples_skipped
        return batch

    def _skip(self, raw: Iterator, batches: int) -> None:
        """Fast-forward `batches` batches. Raw samples need no decoding under on_error=raise
        (any bad one would have raised in the original run); under skip they are decoded so
        dropped samples are accounted exactly as in an uninterrupted run."""
        need = batches * self.cfg.batch_size
        while need > 0:
            url, key, sample = next(raw)
            if self.cfg.on_error == "raise" or self.maker.decode(url, key, sample) is not None:
                need -= 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, p = (info.num_workers, info.id) if info is not None else (1, 0)
        try:
            if self.mode == "eval":
                slot, slots = self.rank * w + p, self.world * w
                yield from self._batches(self._slot_samples(list(range(len(self.shards.urls))), slot, slots), None)
            elif self.elastic is not None:
                logical, first, end = worker_batch_range(self.total, self.start_batch, w, p)
                # local batch k of logical worker = global batch k * w + logical
                yield from self.elastic.batches(range(first * w + logical, end * w + logical, w))
            else:
                logical, first, end = worker_batch_range(self.total, self.start_batch, w, p)
                raw = self._train_samples(self.rank * w + logical, self.world * w, logical)
                self._skip(raw, first)
                yield from self._batches(raw, end - first)
        finally:
            if self.elastic is not None:
                self.elastic.close()
            self._log_counts(p)

    def _log_counts(self, worker: int) -> None:
        if self.stats.samples_skipped:
            log.warning("rank %d worker %d: skipped %d samples (%d truncated shards)", self.rank, worker,
                        self.stats.samples_skipped, self.stats.shards_truncated)
        if self.stats.texts_truncated:
            log.warning("rank %d worker %d: %d descriptions cut to max_text_length=%d tokens", self.rank, worker,
                        self.stats.texts_truncated, self.cfg.max_text_length)


def _member_keys(data: bytes) -> list[str]:
    """Sample keys of an in-memory tar, in order (a member `KEY.suffix` belongs to sample KEY)."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for name in tar.getnames():
            key = member_key(name)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys
