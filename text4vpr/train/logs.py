"""Run logging: metrics as JSONL (always), TensorBoard (optional), on the main process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append one JSON object per event to `metrics.jsonl`; mirror scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; tolerate a stripped install
                self.tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in _flatten(values).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All events of a `metrics.jsonl` (a truncated last line from a kill is ignored)."""
    events = []
    with open(path) as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop the events logged after `step`, atomically: a resumed (or restarted) run logs them
    again, so no step appears twice. A missing file stays missing."""
    from text4vpr.utils.atomic import atomic_write_text

    if not Path(path).exists():
        return
    kept = [e for e in read_metrics(path) if e.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))
