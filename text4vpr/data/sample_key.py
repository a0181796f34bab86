"""Sample keys: `{split}-{index:06d}` per location, a tar member's (key, suffix), a split's name."""

from __future__ import annotations

import os
from pathlib import Path

INDEX_DIGITS = 6


def sample_key(split: str, index: int) -> str:
    """WebDataset key (no dots): split and zero-padded index, unique even with split overlap."""
    return f"{split}-{index:0{INDEX_DIGITS}d}"


def key_index(key: str) -> int | None:
    """The location index a `sample_key` ends in; None for a key of another form."""
    tail = key.rsplit("-", 1)[-1]
    return int(tail) if len(tail) >= INDEX_DIGITS and tail.isdigit() else None


def member_key(name: str) -> tuple[str, str]:
    """(sample key, suffix) of a tar member: its base name split at the first dot (WebDataset's rule)."""
    base, _, suffix = os.path.basename(name).partition(".")
    return base, suffix


def split_name(xlsx: str | os.PathLike) -> str:
    """`train_description.xlsx` -> `train`; any other file -> its stem."""
    stem = Path(xlsx).stem
    return stem[: -len("_description")] if stem.endswith("_description") else stem
