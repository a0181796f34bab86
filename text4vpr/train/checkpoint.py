"""Training checkpoints: safetensors + JSON (nothing pickled), written atomically, verified
against their file list, newest-complete resume. Layout and checks: docs/checkpoints.md."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from text4vpr.utils.atomic import atomic_write_json, save_tensors
from text4vpr.utils.hashing import file_sha256
from text4vpr.utils.errors import InputError, MissingInputError, say

CKPT_RE = re.compile(r"^step-(\d{8})$")
STATE = "state.json"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is incomplete, damaged, or holds something that cannot be restored."""


def file_records(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except state.json."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != STATE)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}


def write_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """state.json, written last (atomically), listing every other file of the folder."""
    atomic_write_json(Path(folder) / STATE, {**state, "files": file_records(folder)}, indent=None)


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint folder (empty: it verifies): state.json unreadable, without
    a file list or of another step than the folder's name, a listed file missing, of another
    size, or of another sha256."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        files, step = state["files"], state.get("step")
        records = [(path / name, int(rec["bytes"]), str(rec["sha256"])) for name, rec in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{path / STATE}: unreadable or without a file list ({type(e).__name__}: {e})"]
    if CKPT_RE.match(path.name) and step != _step_of(path):  # resuming would mislabel every later step
        return [f"{path / STATE}: step {step!r}, but the folder is {path.name}"]
    problems = []
    for f, size, digest in records:
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{f}: {f.stat().st_size} bytes, state.json lists {size} (truncated?)")
        elif file_sha256(f) != digest:
            problems.append(f"{f}: sha256 differs from state.json's (damaged)")
    return problems


def read_verified_state(path: str | os.PathLike, verified: bool = False) -> dict[str, Any]:
    """The checkpoint's state.json (without its file list), after verifying every file
    (`verified=True`: the caller has just done so, e.g. `resolve_resume`; not hashed twice)."""
    problems = [] if verified else verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
    with open(Path(path) / STATE) as f:
        state = json.load(f)
    state.pop("files")
    return state


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states as (tensors, JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders never match the name pattern)."""
    return sorted((p for p in _step_folders(ckpt_dir) if (p / "state.json").exists()), key=_step_of)


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank_rng: list[tuple[dict, dict]],
    is_main: bool = True,
    keep_last: int = 3,
) -> Path | None:
    """Write checkpoint `step` atomically (temp folder, then rename); prune to `keep_last`.

    `rank_rng` holds every rank's (tensors, meta) RNG states, gathered by the caller. Only the
    main process writes.
    """
    final = Path(ckpt_dir) / f"step-{step:08d}"
    if not is_main:
        return final
    tmp = Path(ckpt_dir) / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    rng_meta = []
    for r, (tensors, meta) in enumerate(rank_rng):
        save_tensors(tensors, tmp / f"rng-rank{r}.safetensors")
        rng_meta.append(meta)
    write_state(tmp, {**state, "optimizer": opt_meta, "rng": rng_meta})
    swap_in(tmp, final, ckpt_dir, keep_last)
    return final


def swap_in(tmp: Path, final: Path, ckpt_dir, keep_last: int) -> None:
    """Rename the complete temp folder into place; an older folder of the same step is moved
    aside first and deleted after, so some complete copy exists at every instant."""
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    for leftover in Path(ckpt_dir).glob(".del-step-*"):  # a deletion killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    step = _step_of(final)
    for later in [p for p in _step_folders(ckpt_dir) if _step_of(p) > step]:
        # from a future this run left (resume fell back past it, or resumed an older path):
        # out of the `step-*` name space, kept for inspection, never pruned in place of ours
        os.replace(later, later.with_name(f".abandoned-{later.name}"))
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        _delete(old)


def _step_of(folder: Path) -> int:
    return int(CKPT_RE.match(folder.name).group(1))


def _step_folders(ckpt_dir) -> list[Path]:
    """Every `step-*` folder, complete or not."""
    d = Path(ckpt_dir)
    return [p for p in d.iterdir() if p.is_dir() and CKPT_RE.match(p.name)] if d.is_dir() else []


def _delete(folder: Path) -> None:
    """Rename out of the `step-*` name space first, then delete: a kill midway leaves a
    `.del-` folder, never a half-deleted checkpoint that still counts as complete."""
    doomed = folder.with_name(f".del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def deepspeed_checkpoint_types() -> list:
    """The non-tensor types in DeepSpeed ZeRO-2 and Accelerate RNG files: plain records, an
    enum, the loss-scaler's settings, numpy arrays (and dtype) of RNG state. Nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [LossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype, _reconstruct, *_numpy_dtype_classes()]


def _numpy_dtype_classes() -> list:
    """numpy >= 1.25 pickles the uint32 dtype of its RNG state with its class."""
    dtypes = getattr(np, "dtypes", None)
    return [dtypes.UInt32DType] if dtypes is not None and hasattr(dtypes, "UInt32DType") else []


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
    verified: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return the trainer state dict."""
    path = Path(path)
    state = read_verified_state(path, verified)
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(_join_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer")))
    rng_meta = state.pop("rng")
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.exists() and rank < len(rng_meta):
        set_rng_state(load_file(rng_file), rng_meta[rank])
    else:  # more ranks now than when saved: this rank's random streams start afresh
        say(f"{path}: no RNG state for rank {rank} (saved by {len(rng_meta)} rank(s)): its random streams "
                "(dropout) start afresh; the data order continues at the next global batch")
    return state


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike, report: Callable[[str], None] = say) -> Path | None:
    """`auto` -> newest checkpoint that verifies (those skipped named through `report`; None
    when there is none; an error when there are some and none verifies); a path -> that
    checkpoint, verified; '' -> None."""
    if not resume:
        return None
    if resume == "auto":
        return _newest_verified(ckpt_dir, report)
    p = Path(resume)
    if not (p / STATE).exists():
        raise MissingInputError(f"--resume {resume}: not a complete checkpoint (no state.json)")
    problems = verify_checkpoint(p)
    if problems:
        raise CheckpointError(f"--resume {resume}: does not verify: {'; '.join(problems)}")
    return p


def _newest_verified(ckpt_dir, report: Callable[[str], None]) -> Path | None:
    skipped = []
    for p in reversed(list_checkpoints(ckpt_dir)):
        problems = verify_checkpoint(p)
        if not problems:
            if skipped:
                report(f"resume=auto: skipped {len(skipped)} newer checkpoint(s) that do not verify: {'; '.join(skipped)}")
            return p
        skipped.append(f"{p.name} ({'; '.join(problems)})")
    if skipped:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint verifies: {'; '.join(skipped)}; move the folder aside "
                              "or start over with train.overwrite=true (clears the run directory)")
    return None
