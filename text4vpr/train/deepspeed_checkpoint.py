"""DeepSpeed checkpoints: Accelerate's `save_state` (the engine's own, partitioned, pickle-based
files) in a folder listed and verified like any checkpoint (`train.checkpoint`), and a strict
resume: the engine reads its files through a weights-only loader set on that engine only
(`torch.load` itself is never replaced), this rank's RNG file is read the same way, and any
file that cannot be read stops the resume with its name.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from text4vpr.train.checkpoint import CheckpointError, deepspeed_checkpoint_types, read_verified_state, swap_in, write_state
from text4vpr.utils.errors import weights_only_reason


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
        write_state(tmp, state)  # after every rank's files: all of them listed
        swap_in(tmp, final, ckpt_dir, keep_last)
    acc.wait_for_everyone()
    return final


def safe_torch_load(path: str | os.PathLike, allowed: list, map_location=None) -> Any:
    """torch.load with weights_only=True and exactly the `allowed` extra types; anything else,
    or a damaged file, is a CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read weights-only ({weights_only_reason(e)})") from None


class _WeightsOnlyCheckpointEngine:
    """A DeepSpeed checkpoint engine whose `load` reads weights-only (DeepSpeed's own asks
    torch for weights_only=False); everything else is the engine's original."""

    def __init__(self, inner, allowed: list):
        self._inner, self._allowed = inner, allowed

    def load(self, path, map_location=None):
        return safe_torch_load(path, self._allowed, map_location)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@contextlib.contextmanager
def _weights_only_loads(engine, allowed: list):
    """Inside: this engine (only) reads its files weights-only; its own loader is put back after."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(original, allowed)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


def _restore_accelerate_rng(path: Path) -> None:
    """The RNG states Accelerate's `save_state` wrote for this rank (random_states_<rank>.pkl),
    read weights-only; missing or unreadable is an error (Accelerate only logs it)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the run could not resume exactly")
    states = safe_torch_load(path, deepspeed_checkpoint_types())
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not an Accelerate RNG state ({type(e).__name__}: {e})") from None


def load_deepspeed_checkpoint(engine, path: str | os.PathLike, rank: int, verified: bool = False) -> dict[str, Any]:
    """Counterpart of `save_accelerate_checkpoint` (what Accelerate's `load_state` does under
    DeepSpeed, made strict): verify every file, the engine's model and optimizer state, this
    rank's RNG, then our state; nothing unpickled beyond tensors and `deepspeed_checkpoint_types()`."""
    path = Path(path)
    state = read_verified_state(path, verified)
    allowed = deepspeed_checkpoint_types()
    with _weights_only_loads(engine, allowed):
        loaded, _ = engine.load_checkpoint(str(path), "pytorch_model")
    if loaded is None:
        raise CheckpointError(f"{path / 'pytorch_model'}: DeepSpeed found no engine state to load")
    _restore_accelerate_rng(path / f"random_states_{rank}.pkl")
    return state
