"""Checkpoints: nothing pickled, temp folders ignored, pruning, exact optimizer/RNG round trip."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from text4vpr.train import checkpoint as ckpt
from text4vpr.train import deepspeed_checkpoint as dsckpt


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_opt()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, [ckpt.rng_state()], keep_last=2)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())
    model2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(path, model2, opt2)
    assert state == {"step": 3}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_pruning_and_temp_folders(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"step": step}, [ckpt.rng_state()], keep_last=2)
    (tmp_path / ".tmp-step-00000009").mkdir()  # a write killed midway
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000003"
    assert ckpt.resolve_resume("", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / ".tmp-step-00000009"), tmp_path)


def test_safe_torch_load_refuses_types_not_listed(tmp_path):
    """What DeepSpeed/Accelerate would load with weights_only=False is read weights-only, with
    exactly the listed extra types; torch.load itself is never replaced."""
    from fractions import Fraction

    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "extra": Fraction(1, 3)}, path)
    assert torch.load(path, weights_only=False)["extra"] == Fraction(1, 3)  # an unsafe load would take it
    original = torch.load
    with pytest.raises(ckpt.CheckpointError, match="x.pt"):
        dsckpt.safe_torch_load(path, [])
    assert dsckpt.safe_torch_load(path, [Fraction])["extra"] == Fraction(1, 3)
    assert torch.load is original


# ---------------------------------------------------------------- verified checkpoints
def _three_checkpoints(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"step": step}, [ckpt.rng_state()], keep_last=3)
    return model, opt


def test_state_json_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib
    import json

    _three_checkpoints(tmp_path)
    path = tmp_path / "step-00000003"
    files = json.loads((path / "state.json").read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "state.json")
    assert sorted(files) == on_disk == ["model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"]
    for name, rec in files.items():
        data = (path / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert ckpt.verify_checkpoint(path) == []


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_file_is_named_and_auto_resume_falls_back(tmp_path):
    _three_checkpoints(tmp_path)
    newest = tmp_path / "step-00000003"
    _truncate(newest / "model.safetensors")
    problems = ckpt.verify_checkpoint(newest)
    assert len(problems) == 1 and "model.safetensors" in problems[0]
    model, opt = _model_and_opt()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):  # not an unnamed SafetensorError
        ckpt.load_checkpoint(newest, model, opt)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.resolve_resume(str(newest), tmp_path)
    told = []
    assert ckpt.resolve_resume("auto", tmp_path, report=told.append).name == "step-00000002"
    assert len(told) == 1 and "step-00000003" in told[0] and "model.safetensors" in told[0]
    (tmp_path / "step-00000002" / "state.json").write_text('{"step": 2, "fil')  # a torn state.json
    (tmp_path / "step-00000001" / "rng-rank0.safetensors").write_bytes(b"x" * 10)  # same name, other bytes
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint verifies") as err:
        ckpt.resolve_resume("auto", tmp_path, report=told.append)
    for name in ("step-00000001", "step-00000002", "step-00000003", "state.json", "rng-rank0.safetensors"):
        assert name in str(err.value)


def test_saving_after_a_fallback_keeps_the_run_and_sets_the_damaged_future_aside(tmp_path):
    """Resumed from step 100 past a damaged step 200, the run's next checkpoint (150) must
    survive pruning, and the damaged later one must stop counting as a checkpoint."""
    model, opt = _model_and_opt()
    for step in (100, 200):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"step": step}, [ckpt.rng_state()], keep_last=2)
    _truncate(tmp_path / "step-00000200" / "model.safetensors")
    assert ckpt.resolve_resume("auto", tmp_path, report=lambda m: None).name == "step-00000100"
    ckpt.save_checkpoint(tmp_path, 150, model, opt, {"step": 150}, [ckpt.rng_state()], keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000150"]
    assert (tmp_path / ".abandoned-step-00000200").is_dir()  # kept for inspection, out of the name space
    assert ckpt.resolve_resume("auto", tmp_path, report=lambda m: None).name == "step-00000150"


def test_no_checkpoint_verifies_points_to_a_fix_that_works(tmp_path):
    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, [ckpt.rng_state()], keep_last=2)
    _truncate(tmp_path / "step-00000001" / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="train.overwrite=true") as err:
        ckpt.resolve_resume("auto", tmp_path, report=lambda m: None)
    assert "train.resume=''" not in str(err.value)  # a non-empty run dir refuses that (run_dir.py)


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """A kill in the middle of deleting an old checkpoint leaves nothing that counts as complete."""
    import shutil

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        path = Path(path)
        if not path.exists():
            return
        next(p for p in sorted(path.iterdir()) if p.is_file()).unlink()  # model.safetensors goes first
        raise KeyboardInterrupt("killed while deleting")

    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, [ckpt.rng_state()], keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, [ckpt.rng_state()], keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002"]
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    ckpt.save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, [ckpt.rng_state()], keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]  # the leftover is swept


# ---------------------------------------------------------------- DeepSpeed state, read weights-only
class _FakeEngine:
    """Stands in for a DeepSpeed engine: `load_checkpoint` reads through `checkpoint_engine.load`,
    as DeepSpeed's does; its own engine would unpickle anything (weights_only=False)."""

    class _UnsafeEngine:
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

    def __init__(self):
        self.checkpoint_engine = self._UnsafeEngine()

    def load_checkpoint(self, load_dir, tag):
        self.loaded = self.checkpoint_engine.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt",
                                                  map_location=lambda storage, loc: storage)
        return load_dir, {}


def _deepspeed_like_checkpoint(folder, extra=None):
    """What Accelerate's save_state writes under DeepSpeed: engine files, one RNG pickle per rank."""
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(3.0)}, **(extra or {})}, folder / "pytorch_model" / "mp_rank_00_model_states.pt")
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    torch.save({"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")
    ckpt.write_state(folder, {"step": 5})
    return (torch.rand(2), np.random.rand(2), random.random())


def test_deepspeed_state_is_read_weights_only_and_torch_load_untouched(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    expected = _deepspeed_like_checkpoint(tmp_path / "c")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    engine = _FakeEngine()
    unsafe = engine.checkpoint_engine
    torch.manual_seed(0)
    state = dsckpt.load_deepspeed_checkpoint(engine, tmp_path / "c", rank=0)
    assert state == {"step": 5}
    assert torch.equal(engine.loaded["module"]["w"], torch.arange(3.0))
    assert calls == [True, True]  # the RNG file and the engine's file, both weights-only
    assert torch.load is spy and engine.checkpoint_engine is unsafe  # nothing left replaced
    got = (torch.rand(2), np.random.rand(2), random.random())  # the RNG resumes where it was saved
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_deepspeed_unreadable_state_file_is_an_error(tmp_path):
    pytest.importorskip("deepspeed")
    from fractions import Fraction

    _deepspeed_like_checkpoint(tmp_path / "rng")
    (tmp_path / "rng" / "random_states_0.pkl").write_bytes(b"not a pickle")
    ckpt.write_state(tmp_path / "rng", {"step": 5})  # listed as it is now: only readability can fail
    with pytest.raises(ckpt.CheckpointError, match="random_states_0.pkl"):
        dsckpt.load_deepspeed_checkpoint(_FakeEngine(), tmp_path / "rng", rank=0)
    _deepspeed_like_checkpoint(tmp_path / "norng")
    (tmp_path / "norng" / "random_states_0.pkl").unlink()
    with pytest.raises(ckpt.CheckpointError, match="random_states_0.pkl"):
        dsckpt.load_deepspeed_checkpoint(_FakeEngine(), tmp_path / "norng", rank=0)
    _deepspeed_like_checkpoint(tmp_path / "evil", extra={"x": Fraction(1, 3)})
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt"):
        dsckpt.load_deepspeed_checkpoint(_FakeEngine(), tmp_path / "evil", rank=0)


@pytest.mark.parametrize("text", ['{"step": 1}', '{"files": [1, 2]}', '{"files": {"model.safetensors": 3}}',
                                  '{"files": {"model.safetensors": {"bytes": 1}}}', "[]", "{"])
def test_malformed_file_list_does_not_verify(tmp_path, text):
    (tmp_path / "state.json").write_text(text)
    problems = ckpt.verify_checkpoint(tmp_path)
    assert len(problems) == 1 and "state.json" in problems[0]


def test_a_state_json_of_another_step_than_its_folder_is_refused(tmp_path):
    """state.json says step 1 in folder step-00000003 (files all verify): resuming it would
    mislabel every later step (and cut metrics.jsonl); auto falls back and says why."""
    import json

    _three_checkpoints(tmp_path)
    state_file = tmp_path / "step-00000003" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": 1}))
    said = []
    assert ckpt.resolve_resume("auto", tmp_path, report=said.append).name == "step-00000002"
    assert len(said) == 1 and "step 1, but the folder is step-00000003" in said[0]
    with pytest.raises(ckpt.CheckpointError, match="step 1, but the folder is step-00000003"):
        ckpt.resolve_resume(str(tmp_path / "step-00000003"), tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    import os

    model, opt = _model_and_opt()
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, [ckpt.rng_state()])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes == {name: 0o666 & ~umask for name in modes} and len(modes) == 4, {k: oct(v) for k, v in modes.items()}
