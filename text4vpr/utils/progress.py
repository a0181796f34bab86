"""tqdm bars of the main process: around an iterable (`progress`), or stepped by hand with
training figures (`Progress`). Both do nothing when disabled."""

from __future__ import annotations

from typing import Iterable


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def progress(iterable: Iterable, desc: str, enabled: bool = True, unit: str = "batch") -> Iterable:
    """Wrap `iterable` in a tqdm bar (total from `len()` when it has one) when `enabled`."""
    if not enabled:
        return iterable
    try:
        total = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return _tqdm(iterable=iterable, total=total, desc=desc, unit=unit)


class Progress:
    """The training bar: one tick per optimizer step, with loss, pairs/s, lr and ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = _tqdm(total=total, initial=initial, desc="train", unit="step") if enabled else None

    def update(self, loss: float, pairs_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{pairs_per_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an exception: the next line printed starts a line of its own
