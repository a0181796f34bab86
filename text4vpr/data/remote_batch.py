"""A batch's byte ranges read at once on the file system's event loop (one call per batch).

Over HTTP(S) the ranges of one file go in one request (`http_ranges`): a batch of the elastic
order reads a few samples of each shard of its window, so it costs one request per shard,
not one per sample. Other file systems (s3://, gs://) get one request per range, all in
flight together. Every read keeps `read_range`'s retries, budget and length checks.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from text4vpr.data.http_ranges import NoMultiRange, get_ranges
from text4vpr.data.remote import (
    RemoteOptions, RemoteReadError, bounded, cat_async, checked_length, describe, filesystem, event_loop,
    stall_timeout, with_retries_async, outcome, read_range,
)

MAX_RANGES = 64  # ranges per request: keeps the Range header ~1.5 kB (servers cap header lines, nginx at 8 kB)
_SINGLE_ONLY: set[str] = set()  # servers (scheme://host) that answered a list of ranges with the whole file


def start_ranges(requests: list[tuple[str, int, int]], opts: RemoteOptions, in_flight: int) -> Future:
    """Start reading every (url, offset, length), at most `in_flight` requests running at a time;
    a Future of the list of bytes or `RemoteReadError`s, in order."""
    found = {u: filesystem(u) for u in {u for u, _, _ in requests}}
    fs = found[requests[0][0]][0] if requests else None
    if fs is None or not getattr(fs, "async_impl", False) or any(f is not fs for f, _ in found.values()):
        done: Future = Future()  # a blocking file system (or a mix): read one by one, here
        done.set_result([outcome(read_range, u, o, n, opts) for u, o, n in requests])
        return done
    by_url: dict[str, list[int]] = {}  # url -> positions of its ranges in `requests`
    for k, (u, _, _) in enumerate(requests):
        by_url.setdefault(u, []).append(k)
    groups = [(u, ks[i:i + MAX_RANGES]) for u, ks in by_url.items() for i in range(0, len(ks), MAX_RANGES)]

    async def all_of() -> list:
        gate, out = asyncio.Semaphore(max(1, in_flight)), [None] * len(requests)
        got = await asyncio.gather(*(_group(fs, u, found[u][1], [requests[k][1:] for k in ks], opts, gate)
                                     for u, ks in groups), return_exceptions=True)
        for (u, ks), results in zip(groups, got):
            for k, r in zip(ks, results if isinstance(results, list) else [results] * len(ks)):
                out[k] = r if isinstance(r, (bytes, RemoteReadError)) else _as_read_error(u, r)
        return out

    return asyncio.run_coroutine_threadsafe(all_of(), event_loop(fs))


async def _group(fs, url: str, path: str, spans: list[tuple[int, int]], opts: RemoteOptions, gate) -> list:
    """The ranges of one file: one multi-range request over HTTP(S), else one request each."""
    if len(spans) > 1 and _is_http(fs) and _server(url) not in _SINGLE_ONLY:
        try:
            async with gate:  # the budget counts from the start of a request, not its wait for a slot
                return await with_retries_async(url, lambda budget: _many(fs, url, path, spans, budget, opts), opts)
        except NoMultiRange:
            _SINGLE_ONLY.add(_server(url))
    return await asyncio.gather(*(_one(fs, url, path, o, n, opts, gate) for o, n in spans), return_exceptions=True)


async def _one(fs, url: str, path: str, offset: int, length: int, opts: RemoteOptions, gate) -> bytes:
    if length == 0:
        return b""
    async with gate:
        return await with_retries_async(url, lambda budget: _one_try(fs, url, path, offset, length, budget, opts), opts)


async def _one_try(fs, url, path, offset, length, budget, opts) -> bytes:
    return checked_length(url, await cat_async(fs, path, budget, opts, offset, offset + length), length)


async def _many(fs, url: str, path: str, spans, budget: float, opts: RemoteOptions) -> list[bytes]:
    got = await bounded(get_ranges(fs, path, spans, stall_timeout(opts)), budget)
    return [checked_length(url, data, n) for data, (_, n) in zip(got, spans)]  # a part cut short: tried again


def _is_http(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    needs = ("set_session", "encode_url", "kwargs", "_raise_not_found_for_status")  # fsspec's HTTPFileSystem
    return ("http" in protocols or "https" in protocols) and all(hasattr(fs, n) for n in needs)


def _server(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _as_read_error(url: str, error: BaseException) -> RemoteReadError:
    if isinstance(error, Exception):  # an unexpected error of one read: its own one-line failure
        return RemoteReadError(f"{url}: {describe(error)}")
    raise error  # KeyboardInterrupt and the like
