"""Byte reads from a URL (http(s):// built in; s3://, gs:// ... through their fsspec packages),
with retries, exponential backoff and a bounded total wait per read.

`read_range(url, offset, length)` reads one range (a whole shard is the range (0, bytes)); the
per-sample ranges of a batch go through `remote_batch.start_ranges`, under the same retry
policy (`_Tries`). A read that still fails raises `RemoteReadError` (an `InputError`: one line
naming the URL). Verification and caching sit above, in `fetch`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from text4vpr.utils.errors import InputError

# the URL forms accepted wherever a shard folder is; a bare path (or file://) stays a local path
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://")
_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}


class RemoteReadError(InputError, OSError):
    """A URL could not be read within the retries and the total wait (message names the URL)."""


@dataclass(frozen=True)
class RemoteOptions:
    """How hard one read tries: `retries` after the first try, waiting 2^k * `backoff_s` between
    tries, all within `timeout_s`; a try that receives nothing for `stall_s` is abandoned."""

    retries: int = 4
    timeout_s: float = 120.0
    stall_s: float = 20.0
    backoff_s: float = 0.25


def is_url(location) -> bool:
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def join_url(base: str, name: str) -> str:
    """`name` (a plain file name from a checked manifest) inside the URL prefix `base`."""
    return base.rstrip("/") + "/" + name


def read_range(url: str, offset: int, length: int, opts: RemoteOptions = RemoteOptions()) -> bytes:
    """Exactly `length` bytes of `url` from `offset` (an HTTP Range request), retried on resets,
    5xx answers, stalls and short bodies; `RemoteReadError` once the tries or `timeout_s` run out."""
    if length == 0:
        return b""
    return _with_retries(url, lambda fs, path, budget: checked_length(
        url, _cat(fs, path, budget, opts, offset, offset + length), length), opts)


def read_all(url: str, opts: RemoteOptions = RemoteOptions()) -> bytes:
    """The whole object at `url` (a manifest: its size is not known beforehand)."""
    return _with_retries(url, lambda fs, path, budget: _cat(fs, path, budget, opts), opts)


def outcome(fn, *args):
    """fn(*args), or the ValueError/OSError it raised (one read's failure, kept for its sample)."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        return e


def event_loop(fs):
    """The event loop the fsspec file system runs its coroutines on (fsspec's own thread)."""
    from fsspec.asyn import get_loop

    return fs.loop if getattr(fs, "loop", None) is not None else get_loop()


def checked_length(url: str, data: bytes, length: int) -> bytes:
    """`data` when it is `length` bytes; short: a retry; longer: the server ignored `Range`."""
    if len(data) < length:  # a body cut short without an error: try again
        raise _Transient(f"{len(data)} of {length} bytes received")
    if len(data) > length:  # a server that ignores Range sends the whole object: never guess an offset
        raise RemoteReadError(f"{url}: the server answered a byte-range request with {len(data)} bytes instead of "
                              f"{length} (no Range support?); serve the shards from a server that honours Range")
    return data


class _Transient(Exception):
    """A try that may succeed when repeated."""


class _Tries:
    """The retry policy of one read: `budget()` is the seconds left for another try (None: no
    more tries), `pause(error)` the wait before the next one, or raises when retrying is futile."""

    def __init__(self, url: str, opts: RemoteOptions):
        self.url, self.opts, self.tries, self.last = url, opts, 0, "no try"
        self.deadline = time.monotonic() + opts.timeout_s

    def budget(self) -> float | None:
        left = self.deadline - time.monotonic()
        if self.tries > self.opts.retries or left <= 0:
            return None
        self.tries += 1
        return left

    def pause(self, error: BaseException) -> float:
        url = self.url
        if isinstance(error, FileNotFoundError):
            raise RemoteReadError(f"{url}: not found on the server (404); check the URL and that the whole "
                                  "shard folder was uploaded") from None
        if isinstance(error, PermissionError):  # 403 / missing credentials (s3fs, gcsfs): a retry will not help
            raise RemoteReadError(f"{url}: access denied ({describe(error)}); check the credentials") from None
        if not isinstance(error, _retryable()):
            raise error
        if _permanent(error):  # resets, 5xx, timeouts, stalls, short bodies are retried; 4xx not
            raise RemoteReadError(f"{url}: {describe(error)}") from None
        self.last = describe(error)
        pause = min(self.opts.backoff_s * 2 ** (self.tries - 1) * (0.5 + random.random()), self.deadline - time.monotonic())
        return pause if self.tries <= self.opts.retries else 0.0

    def failed(self) -> RemoteReadError:
        return RemoteReadError(f"{self.url}: unreadable after {self.tries} tries in {self.opts.timeout_s:g} s (last: "
                               f"{self.last}); check the server, or raise data.loader.remote_retries / remote_timeout_s")


def _with_retries(url: str, attempt, opts: RemoteOptions) -> bytes:
    """Run `attempt(fs, path, seconds_left)` until it succeeds, a permanent error, or the budget ends."""
    fs, path = filesystem(url)
    tries = _Tries(url, opts)
    while (left := tries.budget()) is not None:
        try:
            return attempt(fs, path, left)
        except RemoteReadError:
            raise
        except BaseException as e:  # noqa: BLE001 - sorted by the policy: retried, or raised as it is
            pause = tries.pause(e)
        if pause > 0:
            time.sleep(pause)
    raise tries.failed()


async def with_retries_async(url: str, attempt, opts: RemoteOptions):
    """`_with_retries` on the file system's event loop: `await attempt(seconds_left)`."""
    tries = _Tries(url, opts)
    while (left := tries.budget()) is not None:
        try:
            return await attempt(left)
        except (RemoteReadError, asyncio.CancelledError):
            raise
        except BaseException as e:  # noqa: BLE001 - sorted by the policy: retried, or raised as it is
            pause = tries.pause(e)
        if pause > 0:
            await asyncio.sleep(pause)
    raise tries.failed()


def _retryable() -> tuple[type[BaseException], ...]:
    from fsspec.exceptions import FSTimeoutError

    kinds: tuple = (OSError, TimeoutError, asyncio.TimeoutError, FSTimeoutError, _Transient)
    try:
        import aiohttp
    except ImportError:
        return kinds
    return (*kinds, aiohttp.ClientError)


def _permanent(error: BaseException) -> bool:
    """An HTTP 4xx answer (other than timeout / too many requests) will not change on a retry."""
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429)


def describe(error: BaseException) -> str:
    """An error as `Type: first 200 characters of its message` on one line."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _cat(fs, path: str, budget: float, opts: RemoteOptions, start: int | None = None, end: int | None = None) -> bytes:
    """One try: fsspec's cat_file, cancelled after `budget` seconds (async file systems)."""
    if not getattr(fs, "async_impl", False):
        return fs.cat_file(path, **({} if start is None else {"start": start, "end": end}))
    from fsspec.asyn import sync

    return sync(event_loop(fs), cat_async, fs, path, budget, opts, start, end)


async def cat_async(fs, path: str, budget: float, opts: RemoteOptions, start: int | None = None,
                     end: int | None = None) -> bytes:
    """One try on the file system's loop, cancelled when the budget is spent (a stalled connection included)."""
    kwargs = {} if start is None else {"start": start, "end": end}
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "http" in protocols or "https" in protocols:
        kwargs["timeout"] = stall_timeout(opts)
    return await bounded(fs._cat_file(path, **kwargs), budget)


def stall_timeout(opts: RemoteOptions):
    """aiohttp's timeouts: a stall (no byte for stall_s) ends the try early; the total is the budget."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=opts.stall_s, sock_read=opts.stall_s)


async def bounded(coro, budget: float):
    """`await coro`, cancelled after `budget` seconds."""
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(coro, max(budget, 0.01))
    async with asyncio.timeout(max(budget, 0.01)):  # no extra task per read (wait_for makes one before 3.12)
        return await coro


def filesystem(url: str):
    """(fsspec file system, path) for a URL; names the extra to install for s3:// or gs://."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = _EXTRAS.get(scheme)
        hint = f"pip install 'text4vpr[{extra}]'" if extra else f"install the fsspec package for {scheme}://"
        raise RemoteReadError(f"{url}: no file system for {scheme}:// ({e}); {hint}") from None
