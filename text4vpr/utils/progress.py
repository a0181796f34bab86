"""A tqdm bar around an iterable, or the iterable itself when disabled."""

from __future__ import annotations

from typing import Iterable


def progress(iterable: Iterable, desc: str, enabled: bool = True, unit: str = "batch") -> Iterable:
    """Wrap `iterable` in a tqdm bar (total from `len()` when it has one) when `enabled`."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    try:
        total = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
