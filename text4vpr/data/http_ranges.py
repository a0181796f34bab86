"""Several byte ranges of one file in one HTTP request (`Range: bytes=a-b,c-d`, RFC 9110 §14).

A server answers 206 with a `multipart/byteranges` body, one part per range (or fewer, merged
parts), each named by its `Content-Range`. Parts are cut by those lengths, never by searching
for the boundary inside the data. A server that answers 200 (it ignores a list of ranges, as
S3 does) is not read: `NoMultiRange`, and the caller reads the ranges one by one.
"""

from __future__ import annotations

import re

_RANGE = re.compile(rb"content-range:[ \t]*bytes[ \t]+(\d+)-(\d+)/", re.IGNORECASE)


class NoMultiRange(Exception):
    """The server did not answer a list of ranges with their parts (read them one by one)."""


class CutShort(ConnectionError):
    """The multipart body ended before every range it announced (retried, as a reset is)."""


async def get_ranges(fs, url: str, spans: list[tuple[int, int]], timeout) -> list[bytes]:
    """The bytes of each (offset, length) of `url`, through the fsspec HTTP file system's session."""
    kw = dict(fs.kwargs)
    headers = {**kw.pop("headers", {}), "Range": "bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in spans)}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, timeout=timeout, **kw) as r:
        fs._raise_not_found_for_status(r, url)  # 404: FileNotFoundError; other errors: ClientResponseError
        if r.status != 206:
            raise NoMultiRange(f"{url}: HTTP {r.status} to a list of ranges")
        kind = r.headers.get("Content-Type", "")
        body = await r.read()
    if kind.lower().startswith("multipart/byteranges"):
        parts = split_parts(body, _boundary(kind))
    else:  # one part: the server merged the ranges into one
        parts = [(*_content_range(f"content-range: {r.headers.get('Content-Range', '')}".encode()), body)]
    return [_slice(parts, o, n) for o, n in spans]


def split_parts(body: bytes, boundary: bytes) -> list[tuple[int, int, bytes]]:
    """(first, last, data) of each part of a multipart/byteranges body."""
    marker, parts, pos = b"--" + boundary, [], 0
    while True:
        at = body.find(marker, pos)
        if at < 0:
            raise CutShort(f"multipart body ends after {len(parts)} parts")
        at += len(marker)
        if body[at:at + 2] == b"--":  # the closing delimiter
            return parts
        head_end = body.find(b"\r\n\r\n", at)
        if head_end < 0:
            raise CutShort("multipart body ends inside a part's headers")
        first, last = _content_range(body[at:head_end])
        start = head_end + 4
        data = body[start:start + last - first + 1]
        if len(data) != last - first + 1:
            raise CutShort(f"part {first}-{last} cut short at {len(data)} bytes")
        parts.append((first, last, data))
        pos = start + len(data)


def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise NoMultiRange(f"multipart answer without a boundary ({content_type!r})")
    return m[1].encode("latin-1")


def _content_range(head: bytes) -> tuple[int, int]:
    m = _RANGE.search(head)
    if not m:
        raise CutShort("a part without a Content-Range")
    return int(m[1]), int(m[2])


def _slice(parts: list[tuple[int, int, bytes]], offset: int, length: int) -> bytes:
    """The requested range out of the part that holds it (short when none does: retried)."""
    for first, last, data in parts:
        if first <= offset and offset + length - 1 <= last:
            return data[offset - first:offset - first + length]
    return b""
