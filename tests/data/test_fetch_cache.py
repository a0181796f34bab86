"""The fetched-bytes cache evicts its own entries only: a `cache_dir` may be a folder users keep other files in."""

from __future__ import annotations

import os

from text4vpr.data.fetch_cache import ByteCache


def test_eviction_never_deletes_a_file_the_cache_did_not_write(tmp_path):
    """Found from outside: `cache_dir/my/notes.txt`, older than the entries, went at the first eviction."""
    mine = [tmp_path / "my" / "notes.txt", tmp_path / "ab" / "plot.png", tmp_path / "top.txt"]
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 100)
        os.utime(p, ns=(1, 1))  # older than anything the cache writes: first in line by age
    cache = ByteCache(tmp_path, max_bytes=250)
    for i in range(5):
        cache.put(f"key{i}", bytes([i]) * 100)
    assert all(p.read_bytes() == b"x" * 100 for p in mine)
    kept = [i for i in range(5) if cache.get(f"key{i}") is not None]
    assert kept == [3, 4]  # the bound holds over the cache's own entries, least recently used gone first
