"""One run per output directory: a run never writes into another run's folder.

A non-empty `train.output_dir` is refused unless the run resumes it (`train.resume`) with the
same resolved config, or `train.overwrite=true` clears it first. Without this, a second run
appended to the first one's metrics.jsonl, and `resume=auto` later picked whichever run's
checkpoint was newest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import yaml

from text4vpr.config import ConfigError, to_dict
from text4vpr.utils.mapping import flatten

# keys that may differ when resuming: where to stop, how to show progress, and these flags
RESUME_MAY_CHANGE = frozenset({"train.resume", "train.overwrite", "train.progress", "train.max_steps", "train.epochs"})
CONFIG_NAME = "config.yaml"
FIX = "start over with train.overwrite=true, or choose another train.output_dir"


class RunDirError(ConfigError):
    """`train.output_dir` holds another run (or something that is not a run)."""


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for each dotted key both configs hold with different values
    (keys in RESUME_MAY_CHANGE excepted)."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: {a[k]!r} there, {b[k]!r} now" for k in sorted(a.keys() & b.keys())
            if k not in RESUME_MAY_CHANGE and a[k] != b[k]]


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_run_dir(run_dir: Path, cfg) -> bool:
    """Raise RunDirError unless this run may use `run_dir`; return whether to clear it first."""
    t = cfg.train
    if t.resume not in ("", "auto") and not (Path(t.resume) / "state.json").is_file():
        raise RunDirError(f"train.resume={t.resume}: not a complete checkpoint folder (no state.json); pass "
                          f"{run_dir}/checkpoints/step-NNNNNNNN or train.resume=auto")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    saved = run_dir / CONFIG_NAME
    resumes_here = t.resume == "auto" or (t.resume and _is_inside(Path(t.resume), run_dir))
    if t.overwrite:
        if resumes_here:
            raise RunDirError(f"train.overwrite=true with train.resume={t.resume}: overwriting would delete the run "
                              "it resumes; drop one of the two")
        if entries and not saved.is_file():
            raise RunDirError(f"train.overwrite=true: {run_dir} is not a run directory (no {CONFIG_NAME}), so it is "
                              "not cleared; remove it yourself or choose another train.output_dir")
        return bool(entries)
    if not entries:
        return False
    if not resumes_here:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(f"train.output_dir={run_dir} already holds a run ({shown}); resume it with "
                          f"train.resume=auto, {FIX}")
    if not saved.is_file():
        raise RunDirError(f"train.resume={t.resume}: {run_dir} has no {CONFIG_NAME}, so it is not a run to resume; {FIX}")
    diff = config_differences(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    if diff:
        raise RunDirError(f"train.resume={t.resume}: {run_dir} was trained with another config ({'; '.join(diff)}); "
                          f"resume with the same config, {FIX}")
    # the same run, stopped before its first checkpoint: it starts over, so its logs go too
    return t.resume == "auto" and not any((run_dir / "checkpoints").glob("step-*"))


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything inside `run_dir` (checked by `check_run_dir` to be a run directory)."""
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_run_dir(run_dir: Path, cfg, is_main: bool, barrier: Callable[[], None]) -> None:
    """Every rank checks (same verdict, read-only); then the main rank clears when asked to."""
    clear = check_run_dir(run_dir, cfg)
    barrier()  # no rank writes before every rank has looked
    if clear and is_main:
        clear_run_dir(run_dir)
    barrier()
