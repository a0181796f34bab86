"""Training checkpoints: safetensors + JSON, written atomically, newest-complete resume.

Layout of one checkpoint (a folder renamed into place only when complete):
  model.safetensors        full model state (unwrapped)
  optimizer.safetensors    optimizer tensors, keys `state.<param>.<name>`
  rng-rank<r>.safetensors  torch CPU/CUDA generator states of each rank
  state.json               step/epoch/batch position, scheduler, counters, optimizer groups,
                           python/numpy RNG of each rank
Nothing is pickled, so resuming never unpickles a file.

Under DeepSpeed the engine writes its own (pickle-based) files through Accelerate's
`save_state`; resuming reads them with every `torch.load` forced to `weights_only=True`,
allowing only the few plain types those files hold (`weights_only_torch_load`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from text4vpr.utils.atomic import atomic_write_json

CKPT_RE = re.compile(r"^step-(\d{8})$")


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
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


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
    save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng_meta = []
    for r, (tensors, meta) in enumerate(rank_rng):
        save_file(tensors, tmp / f"rng-rank{r}.safetensors")
        rng_meta.append(meta)
    atomic_write_json(tmp / "state.json", {**state, "optimizer": opt_meta, "rng": rng_meta}, indent=None)
    _swap_in(tmp, final, ckpt_dir, keep_last)
    return final


def _swap_in(tmp: Path, final: Path, ckpt_dir, keep_last: int) -> None:
    """Rename the complete temp folder into place; an older folder of the same step is moved
    aside first and deleted after, so some complete copy exists at every instant."""
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_accelerate_checkpoint(acc, ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """DeepSpeed path: Accelerate's `save_state` (DeepSpeed's own, partitioned format) into a
    temp folder that every rank writes, plus our `state.json`; renamed into place when complete."""
    final = Path(ckpt_dir) / f"step-{step:08d}"
    tmp = Path(ckpt_dir) / f".tmp-step-{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "state.json", state, indent=None)
        _swap_in(tmp, final, ckpt_dir, keep_last)
    acc.wait_for_everyone()
    return final


def deepspeed_checkpoint_types() -> list:
    """The non-tensor types in DeepSpeed ZeRO-2 and Accelerate RNG files: plain records, an
    enum, the loss-scaler's settings, numpy arrays of RNG state. Nothing else is accepted."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [LossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype, _reconstruct]


@contextlib.contextmanager
def weights_only_torch_load(allowed: list):
    """Inside: every `torch.load` runs with weights_only=True (DeepSpeed's engine and
    Accelerate's RNG restore ask for False), with exactly the `allowed` extra types."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def load_accelerate_checkpoint(acc, path: str | os.PathLike) -> dict[str, Any]:
    """Counterpart of `save_accelerate_checkpoint`: engine, optimizer, RNG, then our state;
    nothing is unpickled beyond tensors and `deepspeed_checkpoint_types()`."""
    with weights_only_torch_load(deepspeed_checkpoint_types()):
        acc.load_state(str(path))
    with open(Path(path) / "state.json") as f:
        return json.load(f)


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return the trainer state dict."""
    path = Path(path)
    with open(path / "state.json") as f:
        state = json.load(f)
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(_join_optimizer(load_file(path / "optimizer.safetensors"), state.pop("optimizer")))
    rng_meta = state.pop("rng")
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.exists():
        set_rng_state(load_file(rng_file), rng_meta[rank])
    return state


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path | None:
    """`auto` -> newest complete checkpoint (or None); a path -> that checkpoint; '' -> None."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no state.json)")
    return p
