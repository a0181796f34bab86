"""Atomic file writes: a temporary name in the same folder, then a rename, so a reader never sees
a half-written file and a killed writer leaves only a `.tmp-*` file (docs/cli.md#files)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it races with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on clean exit fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename, e.filename2 = str(path), None  # a full disk or a folder in the way: named as the user named it
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; the same tensors and metadata give the same bytes."""
    from safetensors.torch import save

    atomic_write_bytes(path, sorted_header(save(tensors, metadata=metadata)))


def sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes the metadata map
    in a random order (a Rust HashMap), so two saves of one model differ in bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # the data section stays 8-byte aligned, as safetensors pads it
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' streaming `save_file` (for files inside a folder renamed into place when
    complete), with the mode a plain `open` gives instead of its 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())
