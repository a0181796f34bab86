"""One rank's share of a global batch of the elastic order, read sample by sample by byte range.

A rank reads (and decodes) only its own samples. Under `on_error="skip"` a sample that cannot
be read or decoded is left out of its global batch (the rank's batch is one smaller, its
`skipped` count one larger): no rank takes another's sample to fill up. A share left empty
is the trainer's to drop on every rank (`train.data.agreed_batches`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Iterator

import torch

from text4vpr.data.decode import BatchMaker, Stats
from text4vpr.data.loader_config import LoaderError
from text4vpr.data.order import epoch_order, rank_share
from text4vpr.data.sample_index import RangeReader, missing_offsets_message, read_sample, samples_problem
from text4vpr.data.remote import is_url
from text4vpr.data.shard_reader import sample_ranges


def check_offsets(shards, folder: str) -> None:
    """Every shard's manifest entry must list its samples' byte ranges (one line and the fix if not)."""
    if shards.entries is None or shards.counts is None:
        raise LoaderError(f"{folder}: the train order needs a manifest with sample counts and byte offsets "
                          "(a shard folder, or LoaderConfig.manifest)")
    for e in shards.entries:
        if "samples" not in e:
            raise LoaderError(missing_offsets_message(folder))
        problem = samples_problem(e)
        if problem:
            raise LoaderError(f"{folder}: manifest entry {e['name']}: {problem}; rebuild the folder")


class ElasticBatches:
    """Batches of one (epoch, rank, world): `batch(j)` is this rank's part of global batch j."""

    def __init__(self, shards, maker: BatchMaker, stats: Stats, seed: int, epoch: int, window: int,
                 rank: int, world: int, per_rank: int, verify: bool, fetcher=None):
        self.shards, self.maker, self.stats = shards, maker, stats
        self.seed, self.epoch, self.window = seed, epoch, window
        self.rank, self.world, self.global_batch, self.verify = rank, world, per_rank * world, verify
        self._order = self._reader = None
        self.fetcher = fetcher  # shards at URLs: the loader's fetcher (retries, cache); local files: pread
        self._rescanned: dict[int, dict] = {}

    def batch(self, j: int) -> dict:
        return next(iter(self.batches([j])))

    def batches(self, js: Iterable[int]) -> Iterator[dict]:
        """This rank's parts of the global batches `js`, in order; from URLs, each batch's byte
        ranges are fetched at once, the next batch's while this one decodes."""
        if self._order is None:  # built in the worker process: the order array and open files stay there
            self._order = epoch_order(self.shards.counts, self.seed, self.epoch, self.window)
            self._reader = RangeReader()
        js = list(js)
        ahead = self._start(js[0]) if js else None
        try:
            for n, j in enumerate(js):
                pairs, pending = ahead
                fetched = pending.results() if pending is not None else [None] * len(pairs)
                ahead = self._start(js[n + 1]) if n + 1 < len(js) else None
                yield self._collate([self._item(s, i, got) for (s, i), got in zip(pairs, fetched)])
        finally:  # a consumer that stops early: drop the reads still running
            if ahead is not None and ahead[1] is not None:
                ahead[1].cancel()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def _start(self, j: int) -> tuple[list[tuple[int, int]], object]:
        """Global batch j's (shard, sample) pairs for this rank, and their reads started when at URLs."""
        shard, sample = self._order
        part = rank_share(j, self.rank, self.world, self.global_batch)
        pairs = list(zip(shard[part].tolist(), sample[part].tolist()))
        urls = [self.shards.urls[s] for s, _ in pairs]
        if self.fetcher is None or not urls or not all(is_url(u) for u in urls):
            return pairs, None
        records = [self.shards.entries[s]["samples"][i] for s, i in pairs]
        return pairs, self.fetcher.start([(u, r[0], r[1], r[2] if self.verify else None) for u, r in zip(urls, records)])

    def _collate(self, items: list) -> dict:
        kept = [it for it in items if it is not None]
        batch = self.maker.collate(kept)  # empty when every sample of the share was skipped
        batch["skipped"] = torch.tensor(len(items) - len(kept), dtype=torch.int64)  # summed over ranks by the trainer
        return batch

    def _item(self, s: int, i: int, got=None) -> dict | None:
        url, entry = self.shards.urls[s], self.shards.entries[s]
        key = entry["keys"][i]
        try:
            sample = self._read(s, key, entry["samples"][i], got)
        except (ValueError, EOFError, OSError) as e:
            self.stats.fail(f"{url}: sample {key}: {type(e).__name__}: {e}")
            return None
        return self.maker.decode(url, key, sample)

    def _read(self, s: int, key: str, record, got=None) -> dict[str, bytes]:
        """The sample's members; `got`: its bytes (or read error) fetched ahead."""
        url = self.shards.urls[s]
        remote = self.fetcher is not None and is_url(url)  # the fetcher checks the digest itself
        fetch = self._fetch(url, record[2] if self.verify else None) if got is None else partial(_given, got)
        try:
            return read_sample(fetch, url, key, record, self.verify and not remote)
        except (ValueError, EOFError):
            if self.verify:
                raise
            # unverified shards may have been rewritten since the manifest: find the key by its headers
            found = self._rescan(s).get(key)
            if found is None or list(found) == list(record):
                raise
            return read_sample(self._fetch(url), url, key, found, False)

    def _fetch(self, url: str, digest: str | None = None):
        if self.fetcher is not None and is_url(url):  # the digest lets the cache drop a damaged entry and fetch again
            return lambda u, offset, size: self.fetcher.read(u, offset, size, digest)
        return self._reader.read

    def _rescan(self, s: int) -> dict:
        if s not in self._rescanned:
            try:
                self._rescanned[s] = {k: (o, n, d) for k, o, n, d in sample_ranges(self.shards.urls[s])}
            except Exception:  # noqa: BLE001 - a damaged or missing tar: nothing to find
                self._rescanned[s] = {}
        return self._rescanned[s]


def _given(got, url: str, offset: int, size: int) -> bytes:
    """A `fetch` that hands over bytes read ahead (or raises their read's error)."""
    if isinstance(got, BaseException):
        raise got
    return got
