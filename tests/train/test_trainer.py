"""Trainer end to end on a tiny synthetic set: run directory, NaN skip, exact SIGKILL resume."""

import glob
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.train import resolve_config
from text4vpr.train.trainer import NonFiniteLossError, Trainer
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(cache, out, *extra):
    return ["--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.synthetic.cache_dir={cache}",
            f"train.output_dir={out}", *extra]


def _cfg(cache, out, *extra):
    args = tiny_overrides(cache, out, *extra)
    return resolve_config(args[1], args[2:])


def _train(cache, out, *extra):
    return Trainer(_cfg(cache, out, *extra)).train()


def test_run_directory_contents(train_cache, tmp_path):
    final = _train(train_cache, tmp_path / "run", "train.max_steps=4", "train.save_every_steps=2")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "final_metrics.json", "report.md", "report.html", "loss.png",
                 "val_accuracy.png", "accuracy_vs_radius.png"):
        assert (run / name).is_file(), name
    assert (run / "model" / "model.safetensors").is_file()
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"1", "5", "10"} and "chance" in metrics
    assert metrics["num_queries"] == final["num_queries"] > 0
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004"]


def test_learnable_temperature_is_clamped_after_the_step(train_cache, tmp_path):
    trainer = Trainer(_cfg(train_cache, tmp_path / "run", "train.max_steps=1", "loss.learnable=true"))
    with torch.no_grad():
        trainer.loss_fn.log_scale.fill_(math.log(150.0))  # above the cap of 100
    trainer.train()
    assert trainer.state.nonfinite_total == 0
    assert float(trainer.loss_fn.log_scale.detach()) <= math.log(100.0) + 1e-6


def _nan_at_steps(trainer, steps, monkeypatch):
    """Fault injection: the trainer's loss turns NaN at these optimizer steps (no hook in the trainer)."""
    forward = trainer.loss_fn.forward

    def faulty(*args, **kwargs):
        loss = forward(*args, **kwargs)
        return loss * float("nan") if trainer.state.step in steps else loss

    monkeypatch.setattr(trainer.loss_fn, "forward", faulty)


def test_forced_nan_is_skipped_and_counted(train_cache, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(train_cache, tmp_path / "run", "train.max_steps=3", "eval.final=false"))
    _nan_at_steps(trainer, [1], monkeypatch)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.nonfinite_total == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "nonfinite"] == [1]
    after = dict(trainer.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the other steps did train


def test_many_nans_in_a_row_stop_the_run(train_cache, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(train_cache, tmp_path / "run", "train.max_steps=6", "train.max_nonfinite_in_row=3"))
    _nan_at_steps(trainer, [0, 1, 2], monkeypatch)
    with pytest.raises(NonFiniteLossError, match="in a row"):
        trainer.train()


def test_fp16_gradient_overflow_is_a_scaler_backoff_not_a_fault(train_cache, tmp_path):
    """Under fp16 the first steps overflow by design (scale 65536): the scaler backs off; they
    must not count towards max_nonfinite_in_row. A non-finite loss still does. (Accelerate
    has no fp16 scaler on CPU, so one is attached by hand.)"""
    trainer = Trainer(_cfg(train_cache, tmp_path / "run", "train.max_nonfinite_in_row=2", "eval.final=false"))
    trainer.acc.scaler = torch.amp.GradScaler("cpu")
    finite, inf = torch.tensor(1.0), torch.tensor(float("inf"))
    for _ in range(5):
        assert trainer._skip(finite, inf)
    assert trainer.state.nonfinite_total == trainer.state.nonfinite_in_row == 0
    assert trainer.state.loss_scale_backoffs == 5
    assert trainer._skip(torch.tensor(float("nan")), inf) and trainer.state.nonfinite_total == 1
    trainer.log.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events].count("loss_scale_backoff") == 5


def _launch(cache, out, *extra, kill_before=None):
    """train.py in a subprocess; `kill_before` (a glob) SIGKILLs it just before it renames a
    file or folder onto a matching path (tests/kill_at_rename.py: a deterministic crash point)."""
    killer = [str(REPO / "tests" / "kill_at_rename.py"), "before", kill_before] if kill_before else []
    cmd = [sys.executable, *killer, str(REPO / "train.py"), *tiny_overrides(cache, out, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(train_cache, tmp_path):
    """Killed while its step-6 checkpoint is complete but not yet renamed into place: the
    resume starts from step 3 (mid-epoch), redoes steps 4-6 and ends bitwise as the
    uninterrupted run."""
    common = ["train.epochs=2", "train.save_every_steps=3", "data.loader.num_workers=1", "eval.final=false"]
    ref = _launch(train_cache, tmp_path / "ref", *common)
    assert ref.wait(timeout=HANG_GUARD_S) == 0, ref.stderr.read().decode()[-2000:]

    victim = _launch(train_cache, tmp_path / "cut", *common, kill_before=glob.escape(str(tmp_path / "cut" / "checkpoints" / "step-00000006")))
    victim.wait(timeout=HANG_GUARD_S)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert (tmp_path / "cut" / "checkpoints" / ".tmp-step-00000006").is_dir()  # the half-finished save
    newest = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    assert 0 < state["batch_in_epoch"] < 8, state  # killed mid-epoch (8 batches per epoch)

    resumed = _launch(train_cache, tmp_path / "cut", *common, "train.resume=auto")
    assert resumed.wait(timeout=HANG_GUARD_S) == 0, resumed.stderr.read().decode()[-2000:]
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_validation_without_top1_keeps_running(train_cache, tmp_path):
    """Best-model choice needs top-1 within 5 m; other ks / radii must not crash validation."""
    trainer = Trainer(_cfg(train_cache, tmp_path / "run", "train.max_steps=2", "eval.every_steps=1",
                           "eval.ks=[5]", "eval.radii=[7.5]", "eval.final=false"))
    trainer.train()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["kind"] == "val"]
    assert len(vals) == 2 and set(vals[0]["accuracy"]) == {"5"} and set(vals[0]["accuracy"]["5"]) == {"7.5"}


def _steps_logged(run: Path) -> list[tuple[str, int]]:
    return [(e["kind"], e["step"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_restart_after_a_kill_before_the_first_checkpoint_repeats_no_step(train_cache, tmp_path):
    import shutil

    run, common = tmp_path / "run", ["train.max_steps=3", "eval.final=false", "eval.every_steps=2"]
    _train(train_cache, run, *common)
    shutil.rmtree(run / "checkpoints")  # as if killed before the first checkpoint was written
    _train(train_cache, run, *common, "train.resume=auto")
    logged = _steps_logged(run)
    assert len(logged) == len(set(logged)), logged
    assert [s for k, s in logged if k == "train"] == [1, 2, 3] and [s for k, s in logged if k == "val"] == [2]


def test_auto_resume_skips_a_damaged_newest_checkpoint_and_repeats_no_step(train_cache, tmp_path, capsys):
    run, common = tmp_path / "run", ["train.max_steps=4", "train.save_every_steps=2", "eval.final=false"]
    _train(train_cache, run, *common)
    model_file = run / "checkpoints" / "step-00000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    trainer = Trainer(_cfg(train_cache, run, *common, "train.resume=auto"))
    assert trainer.state.step == 2
    out = capsys.readouterr().out
    assert "skipped 1" in out and "step-00000004" in out and "model.safetensors" in out
    trainer.train()
    logged = _steps_logged(run)
    assert len(logged) == len(set(logged)), logged
    assert [s for k, s in logged if k == "train"] == [1, 2, 3, 4]
