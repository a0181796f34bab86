"""Rows of an index part read through a memory map: only the rows asked for are paged in.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. `PartRows` parses that header
(checked like any hostile input: known dtype, byte ranges inside the file and of the size
the shape implies), maps the file read-only and hands out copies of chosen rows of the
(n, V, D) `embeddings`. `release()` drops the mapped pages from this process's resident set
(they stay in the OS page cache); the re-rank's scattered rows are read with pread and never
mapped, so a long-running search does not grow to the file size.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16)}
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON of a few kB; refuse absurd lengths


class PartFormatError(ValueError):
    """The file is not a safetensors part holding an `embeddings` tensor of the expected shape."""


def _tensor_entry(header: dict, name: str, file_size: int, data_start: int) -> tuple[np.dtype, tuple, int, int]:
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise PartFormatError(f"no {name!r} tensor of a float dtype ({', '.join(_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise PartFormatError(f"{name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise PartFormatError(f"{name!r}: bad data offsets {offsets!r}")
    np_dtype = np.dtype(_DTYPES[entry["dtype"]][0])
    begin, end = offsets
    if not 0 <= begin <= end or data_start + end > file_size or end - begin != int(np.prod(shape)) * np_dtype.itemsize:
        raise PartFormatError(f"{name!r}: byte range {begin}..{end} does not fit the file or the shape {shape}")
    return np_dtype, tuple(shape), data_start + begin, entry["dtype"]


class PartRows:
    """Read-only memory map of one part's `embeddings` (n, V, D)."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        with open(self.file, "rb") as f:
            size = self.file.stat().st_size
            raw = f.read(8)
            if len(raw) != 8 or not 0 < struct.unpack("<Q", raw)[0] <= min(_MAX_HEADER, size - 8):
                raise PartFormatError("not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(struct.unpack("<Q", raw)[0]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PartFormatError(f"unreadable safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise PartFormatError("safetensors header is not a JSON object")
            data_start = 8 + struct.unpack("<Q", raw)[0]
            np_dtype, self.shape, offset, st_dtype = _tensor_entry(header, "embeddings", size, data_start)
            self._offset = offset
            if len(self.shape) != 3:
                raise PartFormatError(f"embeddings of shape {self.shape}, expected (n, V, D)")
            self._torch_view = _DTYPES[st_dtype][1]
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        count = int(np.prod(self.shape))
        self._array = np.frombuffer(self._map, dtype=np_dtype, count=count, offset=offset).reshape(self.shape) \
            if count else np.zeros(self.shape, dtype=np_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, index: np.ndarray | slice) -> torch.Tensor:
        """fp32 copy of the chosen rows: (len(index), V, D). A slice (sequential: build, exact
        search) is copied from the map, then its pages released; scattered rows (the re-rank)
        are read with pread, so they never enter the resident set (the map's fault-around would
        map ~64 kB around every 16 kB row)."""
        if isinstance(index, slice):
            block = self._array[index].copy()
            self.release()
        else:
            block = self._pread(np.asarray(index, dtype=np.int64))
        block = torch.from_numpy(block)
        if self._torch_view is not None:
            block = block.view(self._torch_view)
        return block.float()

    def _pread(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), *self.shape[1:]), dtype=self._array.dtype)
        if len(index) and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        row_bytes = out[0].nbytes if len(index) else 0
        with open(self.file, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):  # ask for every row first: the kernel reads the uncached ones in parallel
                for r in index:
                    os.posix_fadvise(f.fileno(), self._offset + int(r) * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
            for i, r in enumerate(index):
                if os.preadv(f.fileno(), [memoryview(out[i]).cast("B")], self._offset + int(r) * row_bytes) != row_bytes:
                    raise PartFormatError(f"{self.file}: short read at row {r} (file changed?)")
        return out

    def release(self) -> None:
        """Drop the pages read so far from the resident set (they stay in the page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._array = None
        if self._map is not None:
            self._map.close()
            self._map = None
