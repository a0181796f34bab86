"""Run logging on the main process: metrics as JSONL (always), mirrored to the experiment
trackers that `train.log_with` started through Accelerate (`trackers.py`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from text4vpr.train.trackers import scalars


class MetricsLogger:
    """Append one JSON object per event to `metrics.jsonl`; mirror its numbers to the trackers
    (`tracker` = the Accelerator after `init_trackers`, or None)."""

    def __init__(self, run_dir: str | os.PathLike, tracker=None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._f.flush()
        if self.tracker is not None:
            self.tracker.log(scalars(kind, values), step=step)

    def close(self) -> None:
        """Close the file and finish the trackers (once; a later call does nothing)."""
        if self.enabled:
            self._f.close()
            self.enabled = False
        if self.tracker is not None:  # not end_training(): that also destroys the process group
            for t in self.tracker.trackers:
                t.finish()
            self.tracker = None


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
