"""One run per output directory: a run never writes into another run's folder, and never
deletes a file the package did not write.

A non-empty `train.output_dir` is refused unless the run resumes it (`train.resume`) with the
same resolved config, or `train.overwrite=true` clears it first. Clearing removes only the
names the folder's run manifest (`.text4vpr-run.json`, written before any other file of the
run) lists; a folder holding anything else is refused, naming it. The main rank holds a lock
on the folder (`.text4vpr-run.lock`) for the whole run, so two runs never write into one
folder at once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from text4vpr.config import ConfigError, to_dict
from text4vpr.retrieval.per_query import PER_QUERY_JSONL
from text4vpr.retrieval.report import PLOT_PNG, REPORT_MD
from text4vpr.train.report import FINAL_METRICS
from text4vpr.train.trackers import TRACKERS_DIR
from text4vpr.utils.atomic import atomic_write_json
from text4vpr.utils.mapping import flatten

# keys that may differ when resuming: where to stop, how to show progress, where the folder is now
RESUME_MAY_CHANGE = frozenset({"train.resume", "train.overwrite", "train.progress", "train.max_steps", "train.epochs",
                               "train.output_dir"})
CONFIG_NAME = "config.yaml"
RUN_MANIFEST = ".text4vpr-run.json"
LOCK_NAME = ".text4vpr-run.lock"
PACKAGE_FILES = frozenset({RUN_MANIFEST, LOCK_NAME})  # the folder's own bookkeeping: never a run's output
# every top-level name a training run writes into its folder, and the temp names of its atomic
# writes (`.tmp-NAME.*`); recorded in RUN_MANIFEST before the run writes anything, so a clear
# never reaches a user's own file: exact names, no pattern that a user's `figure.png` matches
RUN_OUTPUTS = (CONFIG_NAME, "metrics.jsonl", "checkpoints", TRACKERS_DIR, "model", "best_model", "shards", FINAL_METRICS,
               "metrics.json", PER_QUERY_JSONL, REPORT_MD, "report.html", PLOT_PNG, "loss.png", "val_accuracy.png")
RUN_TEMPS = tuple(f".tmp-{name}.*" for name in RUN_OUTPUTS)
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


def _compare(saved: Path, cfg, what: str) -> None:
    """RunDirError listing the keys where the config saved at `saved` differs from `cfg`."""
    diff = config_differences(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    if diff:
        raise RunDirError(f"train.resume={cfg.train.resume}: {what} was trained with another config "
                          f"({'; '.join(diff)}); resume with the same config, {FIX}")


def check_run_dir(run_dir: Path, cfg) -> bool:
    """Raise RunDirError unless this run may use `run_dir`; return whether to clear it first."""
    t = cfg.train
    if t.resume not in ("", "auto") and not (Path(t.resume) / "state.json").is_file():
        raise RunDirError(f"train.resume={t.resume}: not a complete checkpoint folder (no state.json); pass "
                          f"{run_dir}/checkpoints/step-NNNNNNNN or train.resume=auto")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    saved = run_dir / CONFIG_NAME
    resumes_here = t.resume == "auto" or (t.resume and _is_inside(Path(t.resume), run_dir))
    if t.resume and not resumes_here and (Path(t.resume).parent.parent / CONFIG_NAME).is_file():
        # another run's checkpoint: its batch size, data, model must be this run's too
        _compare(Path(t.resume).parent.parent / CONFIG_NAME, cfg, f"checkpoint {t.resume}")
    if t.overwrite:
        if resumes_here:
            raise RunDirError(f"train.overwrite=true with train.resume={t.resume}: overwriting would delete the run "
                              "it resumes; drop one of the two")
        return bool(set(entries) - PACKAGE_FILES)
    if not set(entries) - PACKAGE_FILES:
        return False
    if not resumes_here:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(f"train.output_dir={run_dir} already holds a run ({shown}); resume it with "
                          f"train.resume=auto, {FIX}")
    if not saved.is_file():
        raise RunDirError(f"train.resume={t.resume}: {run_dir} has no {CONFIG_NAME}, so it is not a run to resume; {FIX}")
    _compare(saved, cfg, str(run_dir))
    # the same run, stopped before its first checkpoint: it starts over, so its logs go too
    return t.resume == "auto" and not any((run_dir / "checkpoints").glob("step-*"))


def recorded_outputs(run_dir: Path) -> list[str] | None:
    """The names the folder's run manifest lists as the package's own (None: no readable manifest)."""
    try:
        written = json.loads((run_dir / RUN_MANIFEST).read_text()).get("written")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(written, list) and all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
                                           for n in written)
    return written if ok else None  # a crafted manifest never names a path outside the folder


def own_entries(run_dir: Path, cfg) -> list[str]:
    """The entries of `run_dir` a clear removes; RunDirError naming the rest when the folder
    holds anything the package did not record as its own (nothing is removed then)."""
    entries = sorted(p.name for p in run_dir.iterdir() if p.name not in PACKAGE_FILES)
    patterns = recorded_outputs(run_dir)
    own = [e for e in entries if patterns is not None and _matches(e, patterns) and _matches(e, RUN_OUTPUTS + RUN_TEMPS)]
    foreign = [e for e in entries if e not in own]
    if foreign:
        why = (f"no readable {RUN_MANIFEST}: nothing there was recorded as written by text4vpr" if patterns is None
               else f"{_names(foreign)} were not written by text4vpr")
        action = "train.overwrite=true" if cfg.train.overwrite else "train.resume=auto without a checkpoint (a restart)"
        raise RunDirError(f"train.output_dir={run_dir}: {action} would remove {_names(own) or 'nothing'}, but {why}; "
                          f"nothing was removed: move those files out, or choose another train.output_dir")
    return own


def _matches(name: str, patterns) -> bool:
    # both the manifest and this version's own list must claim a name: an older manifest
    # recorded "*.png" and ".tmp-*", which a user's files match too
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def clear_run_dir(run_dir: Path, names: list[str]) -> None:
    """Remove `names` (checked by `own_entries` to be the package's own) from `run_dir`."""
    for name in names:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def record_run(run_dir: Path) -> None:
    """Write the run manifest (atomically) before the run writes anything else."""
    atomic_write_json(run_dir / RUN_MANIFEST, {"format": "text4vpr-run", "version": 1, "written": list(RUN_OUTPUTS + RUN_TEMPS)})


_HELD: dict[str, tuple[int, int]] = {}  # resolved folder -> (fd, inode) of the locks this process holds


def lock_run_dir(run_dir: Path) -> bool:
    """Hold an exclusive lock on `run_dir` (created if missing) until this process exits or
    `unlock_run_dir`; RunDirError when another process holds it. Taking it again in this
    process is a no-op. Returns whether this call created the lock file."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    key, lock = str(run_dir.resolve()), run_dir / LOCK_NAME
    if key in _HELD and lock.exists() and _HELD[key][1] == lock.stat().st_ino:
        return False
    created = not lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        # a POSIX record lock: owned by this process alone (a forked DataLoader worker that
        # outlives a killed run does not inherit it), released by the kernel when it ends
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(f"train.output_dir={run_dir}: another training run is using this folder (it holds "
                          f"{LOCK_NAME}); wait for that run to end, or choose another train.output_dir") from None
    _HELD[key] = (fd, os.fstat(fd).st_ino)
    return created


def unlock_run_dir(run_dir: Path, remove_file: bool = False, remove_dir: bool = False) -> None:
    """Release this process's lock on `run_dir`; after a refusal, remove what taking it created
    (the lock file; the folder, when it was created and is empty again)."""
    held = _HELD.pop(str(run_dir.resolve()), None)
    if held is not None:
        os.close(held[0])  # closing releases the POSIX lock
    if remove_file:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    if remove_dir and not any(run_dir.iterdir()):
        run_dir.rmdir()


def prepare_run_dir(run_dir: Path, cfg, is_main: bool, barrier: Callable[[], None],
                    share: Callable[[object], object] | None = None, report: Callable[[str], None] = print) -> None:
    """The main rank locks the folder; every rank checks (same verdict, read-only); then the
    main rank clears the package's own files when asked to and records the run manifest.
    `share`: the main rank's value on every rank (a broadcast; None in one process)."""
    refusal, created, existed = None, False, run_dir.exists()
    if is_main:
        try:
            created = lock_run_dir(run_dir)
        except RunDirError as e:
            refusal = str(e)
    refusal = share(refusal) if share is not None else refusal
    if refusal:
        raise RunDirError(refusal)
    try:
        clear = check_run_dir(run_dir, cfg)
        removed = own_entries(run_dir, cfg) if clear else []
    except RunDirError:
        if is_main:  # refused: leave the folder as it was found
            unlock_run_dir(run_dir, remove_file=created, remove_dir=not existed)
        raise
    barrier()  # no rank writes before every rank has looked
    if is_main:
        clear_run_dir(run_dir, removed)
        if removed and not cfg.train.overwrite:
            report(f"train.resume=auto: {run_dir} has no checkpoint yet, so the run starts from step 0 "
                   f"(removed this run's {_names(removed)})")
        if recorded_outputs(run_dir) is None:
            record_run(run_dir)
    barrier()
