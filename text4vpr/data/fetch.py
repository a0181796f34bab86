"""Verified, cached, prefetched byte ranges of remote shards (one `Fetcher` per loader worker).

`read(url, offset, length, sha256)` returns bytes that match the manifest's digest, from the
local cache when it holds them (an entry that no longer matches is dropped and fetched
again), else from the server (`remote.read_range`); only verified bytes enter the cache.
`ahead(requests)` keeps `in_flight` reads running while the caller decodes earlier ones;
`start(requests)` starts the byte ranges of a batch at once (one call into the event loop).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

from text4vpr.data.fetch_cache import ByteCache
from text4vpr.data.remote import RemoteOptions, outcome, read_range
from text4vpr.data.remote_batch import start_ranges
from text4vpr.utils.errors import InputError
from text4vpr.utils.hashing import bytes_sha256


class DigestMismatch(InputError, ValueError):
    """Bytes read from a URL differ from the manifest's digest (message names the URL)."""


class Fetcher:
    def __init__(self, opts: RemoteOptions = RemoteOptions(), cache: ByteCache | None = None, in_flight: int = 4):
        self.opts, self.cache, self.in_flight = opts, cache, max(1, in_flight)
        self._pool: ThreadPoolExecutor | None = None

    def read(self, url: str, offset: int, length: int, sha256: str | None = None) -> bytes:
        """`length` bytes of `url` at `offset`, checked against `sha256` when given."""
        cached = self._cached(url, offset, length, sha256)
        if cached is not None:
            return cached
        return self._checked(url, offset, length, sha256, read_range(url, offset, length, self.opts))

    def start(self, requests: list[tuple[str, int, int, str | None]]) -> "Pending":
        """Start every read at once (`in_flight` requests running at a time, one call into the
        event loop); `Pending.results()` waits for them."""
        got: list = [self._cached(*r) for r in requests]
        todo = [i for i, data in enumerate(got) if data is None]
        return Pending(self, requests, got, todo, start_ranges([requests[i][:3] for i in todo], self.opts, self.in_flight))

    def _cached(self, url: str, offset: int, length: int, sha256: str | None) -> bytes | None:
        key = _cache_key(url, offset, length)
        if self.cache is None or (data := self.cache.get(key)) is None:
            return None
        if sha256 is None or bytes_sha256(data) == sha256:
            return data
        self.cache.drop(key)  # a damaged entry: fetch again
        return None

    def _checked(self, url: str, offset: int, length: int, sha256: str | None, data: bytes) -> bytes:
        """Fetched bytes against the manifest's digest, then into the cache."""
        if sha256 is not None and bytes_sha256(data) != sha256:
            raise DigestMismatch(f"{url}: sha256 of bytes {offset}..{offset + length} does not match its manifest "
                                 "entry (a changed, damaged or replaced shard on the server; rebuild or re-upload it)")
        if self.cache is not None:
            self.cache.put(_cache_key(url, offset, length), data)
        return data

    def ahead(self, requests: Iterable[tuple[str, int, int, str | None]]) -> Iterator[Future]:
        """Futures of `read(*request)`, in order, with up to `in_flight` reads running ahead."""
        if self._pool is None:  # made lazily: in the loader worker, after the fork
            self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="text4vpr-fetch")
        pending: deque[Future] = deque()
        todo = iter(requests)
        try:
            for request in todo:
                pending.append(self._pool.submit(self.read, *request))
                if len(pending) >= self.in_flight:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:  # the consumer stopped early: drop reads not yet started
            for f in pending:
                f.cancel()


def _cache_key(url: str, offset: int, length: int) -> str:
    return f"{url}#{offset}+{length}"


class Pending:
    """Reads started by `Fetcher.start`: `results()` gives, in order, each read's bytes (checked
    as `Fetcher.read` checks them) or its exception; `cancel()` drops those not done."""

    def __init__(self, fetcher: Fetcher, requests: list, got: list, todo: list[int], future: Future):
        self.fetcher, self.requests, self.got, self.todo, self.future = fetcher, requests, got, todo, future

    def results(self) -> list:
        for i, data in zip(self.todo, self.future.result()):
            self.got[i] = data if isinstance(data, Exception) else outcome(self.fetcher._checked, *self.requests[i], data)
        self.todo = []
        return self.got

    def cancel(self) -> None:
        self.future.cancel()
