"""A size-bounded local cache of fetched bytes, shared by every process that reads one folder.

Entries are written to a temporary file and renamed into place (a reader never sees a
half-written entry); a read refreshes the entry's mtime, and a write that takes the cache
over its bound evicts the least recently used entries first.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path


_ENTRY = re.compile(r"[0-9a-f]{64}")  # an entry's name: its key's sha256, in the folder of its first 2 digits


class ByteCache:
    """Bytes by key under `root`, at most `max_bytes` in all (least recently used evicted)."""

    RESCAN_EVERY = 64  # puts between scans of the folder (other processes' writes count then)

    def __init__(self, root: str | Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self._total: int | None = None  # bytes in the cache at the last scan + this process's writes since
        self._puts = 0

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            with open(path, "rb") as f:  # an entry evicted after open stays readable (POSIX)
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # most recently used
        except FileNotFoundError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store `data` atomically (temp file + rename), then evict down to the bound."""
        if len(data) > self.max_bytes:
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._puts += 1
        if self._total is None or self._puts % self.RESCAN_EVERY == 0:
            self._total = self.evict()
            return
        self._total += len(data)
        if self._total > self.max_bytes:  # a scan per put would cost O(entries) each time
            self._total = self.evict()

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def evict(self) -> int:
        """Remove least recently used entries until the total is within `max_bytes`; the total left."""
        entries = []
        for path in self.root.glob("??/*"):
            if not (_ENTRY.fullmatch(path.name) and path.parent.name == path.name[:2]):
                continue  # a file the cache did not write (cache_dir may hold a user's files too)
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        return total
