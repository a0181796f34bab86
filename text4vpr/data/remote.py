"""Byte reads from a URL (http(s):// built in; s3://, gs:// ... through their fsspec packages),
with retries, exponential backoff and a bounded total wait per read.

`read_range(url, offset, length)` is the one primitive: whole shards are the range (0, bytes),
per-sample reads are smaller ranges. A read that still fails raises `RemoteReadError` (an
`InputError`: one line naming the URL). Verification and caching sit above, in `fetch`.
"""

from __future__ import annotations

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
    return _with_retries(url, lambda fs, path, budget: _checked_length(
        url, _cat(fs, path, budget, opts, offset, offset + length), length), opts)


def read_all(url: str, opts: RemoteOptions = RemoteOptions()) -> bytes:
    """The whole object at `url` (a manifest: its size is not known beforehand)."""
    return _with_retries(url, lambda fs, path, budget: _cat(fs, path, budget, opts), opts)


def _checked_length(url: str, data: bytes, length: int) -> bytes:
    if len(data) < length:  # a body cut short without an error: try again
        raise _Transient(f"{len(data)} of {length} bytes received")
    if len(data) > length:  # a server that ignores Range sends the whole object: never guess an offset
        raise RemoteReadError(f"{url}: the server answered a byte-range request with {len(data)} bytes instead of "
                              f"{length} (no Range support?); serve the shards from a server that honours Range")
    return data


class _Transient(Exception):
    """A try that may succeed when repeated."""


def _with_retries(url: str, attempt, opts: RemoteOptions) -> bytes:
    """Run `attempt(fs, path, seconds_left)` until it succeeds, a permanent error, or the budget ends."""
    fs, path = _filesystem(url)
    deadline = time.monotonic() + opts.timeout_s
    last, tries = "no try", 0
    while tries <= opts.retries and (left := deadline - time.monotonic()) > 0:
        tries += 1
        try:
            return attempt(fs, path, left)
        except FileNotFoundError:
            raise RemoteReadError(f"{url}: not found on the server (404); check the URL and that the whole "
                                  "shard folder was uploaded") from None
        except PermissionError as e:  # 403 / missing credentials (s3fs, gcsfs): a retry will not help
            raise RemoteReadError(f"{url}: access denied ({_describe(e)}); check the credentials") from None
        except _retryable() as e:  # resets, 5xx, timeouts, stalls, short bodies
            if _permanent(e):
                raise RemoteReadError(f"{url}: {_describe(e)}") from None
            last = _describe(e)
        pause = min(opts.backoff_s * 2 ** (tries - 1) * (0.5 + random.random()), deadline - time.monotonic())
        if tries <= opts.retries and pause > 0:
            time.sleep(pause)
    raise RemoteReadError(f"{url}: unreadable after {tries} tries in {opts.timeout_s:g} s (last: {last}); "
                          "check the server, or raise data.loader.remote_retries / remote_timeout_s")


def _retryable() -> tuple[type[BaseException], ...]:
    import asyncio

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


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _cat(fs, path: str, budget: float, opts: RemoteOptions, start: int | None = None, end: int | None = None) -> bytes:
    """One try: fsspec's cat_file, cancelled after `budget` seconds (async file systems)."""
    kwargs = {} if start is None else {"start": start, "end": end}
    if not getattr(fs, "async_impl", False):
        return fs.cat_file(path, **kwargs)
    import asyncio

    from fsspec.asyn import sync

    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "http" in protocols or "https" in protocols:
        import aiohttp

        # a stall (no byte for stall_s) ends the try early; the total is the budget
        kwargs["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=opts.stall_s, sock_read=opts.stall_s)

    async def bounded():  # cancelled when the budget is spent (a stalled connection included)
        return await asyncio.wait_for(fs._cat_file(path, **kwargs), max(budget, 0.01))

    return sync(fs.loop, bounded)


def _filesystem(url: str):
    """(fsspec file system, path) for a URL; names the extra to install for s3:// or gs://."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = _EXTRAS.get(scheme)
        hint = f"pip install 'text4vpr[{extra}]'" if extra else f"install the fsspec package for {scheme}://"
        raise RemoteReadError(f"{url}: no file system for {scheme}:// ({e}); {hint}") from None
