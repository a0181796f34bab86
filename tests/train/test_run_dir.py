"""Runs never mix in one output_dir: refused unless resumed with the same config or overwritten."""

import json
from pathlib import Path

import pytest

from text4vpr.config import dump_yaml
from text4vpr.train import resolve_config
from text4vpr.train.run_dir import RunDirError, check_run_dir, prepare_run_dir
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_test.yaml")


def _cfg(out, *extra):
    return resolve_config(TINY, [f"train.output_dir={out}", *extra])


def _old_run(out, *extra, checkpoint=True):
    """A finished-looking run directory written by hand (config.yaml, metrics, a checkpoint)."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_yaml(_cfg(out, *extra)))
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    if checkpoint:
        (out / "checkpoints" / "step-00000005").mkdir(parents=True)
    return out


def test_empty_or_missing_dir_is_used(tmp_path):
    assert check_run_dir(tmp_path / "new", _cfg(tmp_path / "new")) is False
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty", _cfg(tmp_path / "empty", "train.resume=auto")) is False


def test_second_run_into_a_used_dir_is_refused(tmp_path):
    run = _old_run(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"train.output_dir=.*already holds a run .*train.resume=auto.*train.overwrite=true"):
        check_run_dir(run, _cfg(run))


def test_overwrite_clears_first(tmp_path):
    run = _old_run(tmp_path / "run")
    prepare_run_dir(run, _cfg(run, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert list(run.iterdir()) == []


def test_overwrite_never_clears_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a run directory"):
        prepare_run_dir(tmp_path, _cfg(tmp_path, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_with_resume_is_refused(tmp_path):
    run = _old_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="overwrite=true with train.resume=auto"):
        check_run_dir(run, _cfg(run, "train.overwrite=true", "train.resume=auto"))


def test_resume_auto_needs_the_same_config(tmp_path):
    run = _old_run(tmp_path / "run", "optim.lr=0.001")
    assert check_run_dir(run, _cfg(run, "optim.lr=0.001", "train.resume=auto", "train.max_steps=9")) is False
    with pytest.raises(RunDirError, match=r"another config \(optim.lr: 0.001 there, 0.0003 now\)"):
        check_run_dir(run, _cfg(run, "optim.lr=0.0003", "train.resume=auto"))


def test_resume_auto_without_a_checkpoint_starts_the_same_run_over(tmp_path):
    run = _old_run(tmp_path / "run", checkpoint=False)
    prepare_run_dir(run, _cfg(run, "train.resume=auto"), is_main=True, barrier=lambda: None)
    assert not (run / "metrics.jsonl").exists()


def test_resume_into_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(RunDirError, match="no config.yaml"):
        check_run_dir(tmp_path, _cfg(tmp_path, "train.resume=auto"))


def test_trainer_refuses_before_touching_the_old_run(train_cache, tmp_path):
    """A real run, then a second one into the same folder: refused; with overwrite, only the new run's events remain."""
    out = tmp_path / "run"
    args = [f"data.synthetic.cache_dir={train_cache}", "train.max_steps=1", "eval.final=false"]
    Trainer(_cfg(out, *args)).train()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(_cfg(out, *args, "train.seed=1"))
    assert (out / "metrics.jsonl").read_text() == before
    Trainer(_cfg(out, *args, "train.seed=1", "train.overwrite=true")).train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(before.splitlines())
    assert "seed: 1" in (out / "config.yaml").read_text()
