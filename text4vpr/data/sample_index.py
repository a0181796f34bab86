"""Reading a shard sample by sample: the byte ranges (`shard_reader.sample_ranges`) fetched and parsed.

A sample's members (`KEY.json`, `KEY.1.jpg`, ...) are contiguous in a tar, so one byte range
(first header to the end of the last member's padded data) holds all of them. The manifest
lists, per shard, `samples`: one `[offset, size, sha256]` per key, written at build time (or
added to an older folder by `index_offsets`). A reader fetches exactly those bytes
(`fetch_range`: a local file, or any URL fsspec opens; a remote reader can replace it) and
`parse_sample` splits them into members, checking the key and (with a digest) the bytes.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Callable

from text4vpr.data.shard_reader import BLOCK, MANIFEST, ShardError, file_sha256, load_manifest, sample_ranges
from text4vpr.utils.atomic import atomic_write_json
from text4vpr.utils.hashing import bytes_sha256

INDEX_COMMAND = "text4vpr shards index-offsets"


def parse_sample(data: bytes, key: str) -> dict[str, bytes]:
    """A sample's bytes (headers included) -> {suffix: member bytes}; ValueError when a header
    is damaged, names another key, or a member runs past the range (stale offsets)."""
    members, pos = {}, 0
    while pos < len(data):
        if len(data) - pos < BLOCK:
            raise ValueError(f"{len(data) - pos} stray bytes after the last member")
        try:
            info = tarfile.TarInfo.frombuf(data[pos:pos + BLOCK], "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ValueError(f"no tar header at byte {pos} of the sample ({e})") from None
        base, _, suffix = os.path.basename(info.name).partition(".")
        start, end = pos + BLOCK, pos + BLOCK + info.size
        if base != key:
            raise ValueError(f"member {info.name!r} at byte {pos} is not of sample {key}")
        if end > len(data):
            raise ValueError(f"member {info.name!r} runs past the sample's {len(data)} bytes")
        if info.isreg():
            members[suffix] = data[start:end]
        pos = start + -(-info.size // BLOCK) * BLOCK
    if not members:
        raise ValueError("no members")
    return members


class RangeReader:
    """`read(url, offset, size)`: exactly those bytes of a local file (kept open, a few at a
    time) or of any URL fsspec opens; EOFError when the file is shorter."""

    def __init__(self, max_open: int = 16):
        self.max_open, self.files = max_open, {}

    def read(self, url: str, offset: int, size: int) -> bytes:
        if "://" in url and not url.startswith("file://"):
            import fsspec

            data = fsspec.core.url_to_fs(url)[0].cat_file(url, start=offset, end=offset + size)
        else:
            data = os.pread(self._fd(url.removeprefix("file://")), size, offset)
        if len(data) != size:
            raise EOFError(f"{len(data)} of {size} bytes at offset {offset}: the shard is shorter than its manifest says (truncated?)")
        return data

    def _fd(self, path: str) -> int:
        fd = self.files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.files) >= self.max_open:
                os.close(self.files.pop(next(iter(self.files))))  # the least recently used
        self.files[path] = fd  # re-inserted: most recently used last
        return fd

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def read_sample(fetch: Callable[[str, int, int], bytes], url: str, key: str, record, verify: bool) -> dict[str, bytes]:
    """One sample's members through `fetch(url, offset, size)` (e.g. `RangeReader().read`);
    with `verify`, its bytes must have the manifest's sha256."""
    offset, size, digest = record
    data = fetch(url, offset, size)
    if verify and bytes_sha256(data) != digest:
        raise ValueError("sha256 does not match its manifest entry (a changed, damaged or replaced shard; "
                         "rebuild it, or verify=False to read it unchecked)")
    return parse_sample(data, key)


def samples_problem(entry: dict) -> str | None:
    """What makes a manifest shard entry's `samples` unusable (None: sound or absent)."""
    samples, keys = entry.get("samples"), entry.get("keys")
    if samples is None:
        return None
    if not isinstance(samples, list) or not isinstance(keys, list) or len(samples) != len(keys) \
            or len(keys) != entry.get("count"):
        return "its samples list does not match its keys"
    for s in samples:
        if not (isinstance(s, list) and len(s) == 3 and all(isinstance(x, int) and x >= 0 for x in s[:2])
                and isinstance(s[2], str) and s[1] >= BLOCK):
            return f"sample record {s!r:.60} is not [offset, size, sha256]"
        if s[0] + s[1] > entry.get("bytes", 0):
            return f"sample record {s!r:.60} reaches past the shard's {entry.get('bytes')} bytes"
    return None


def missing_offsets_message(folder: str) -> str:
    return (f"{folder}: its manifest has no per-sample byte offsets (built before they were recorded); "
            f"add them with `{INDEX_COMMAND} {folder}` (reads the shards, rewrites only {MANIFEST})")


def index_offsets(folder: str | os.PathLike) -> dict:
    """Add per-sample `samples` records to a built folder's manifest (the tars are not rewritten):
    each shard is first checked against its manifest sha256, size and keys. Returns the manifest."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise ShardError(f"{path}: missing, or not the shard its manifest describes (size/sha256); rebuild the folder")
        ranges = sample_ranges(path)
        keys = [r[0] for r in ranges]
        if keys != entry.get("keys", keys) or len(keys) != entry["count"]:
            raise ShardError(f"{path}: its samples differ from the manifest's keys/count; rebuild the folder")
        entry["keys"] = keys  # folders older than the key lists get them too
        entry["samples"] = [[o, s, d] for _, o, s, d in ranges]
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest
