"""Runs never mix in one output_dir: refused unless resumed with the same config or overwritten."""

import json
from pathlib import Path

import pytest

from text4vpr.config import dump_yaml
from text4vpr.train import resolve_config
from text4vpr.train.run_dir import (
    LOCK_NAME, PACKAGE_FILES, RUN_MANIFEST, RunDirError, check_run_dir, prepare_run_dir, record_run,
)
from text4vpr.train.trainer import Trainer
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_test.yaml")


def _cfg(out, *extra):
    return resolve_config(TINY, [f"train.output_dir={out}", *extra])


def _old_run(out, *extra, checkpoint=True):
    """A finished-looking run directory written by hand (config.yaml, metrics, a checkpoint)."""
    out.mkdir(parents=True)
    record_run(out)  # what the trainer writes first
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
    assert sorted(p.name for p in run.iterdir()) == sorted(PACKAGE_FILES)


def test_overwrite_never_clears_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=f"no readable {RUN_MANIFEST}"):
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


def test_resume_restart_never_deletes_a_users_file(tmp_path):
    """A run stopped before its first checkpoint, a user's notes beside it, then resume=auto
    (what launch/slurm_train.sbatch passes): refused, naming the file; nothing removed."""
    run = _old_run(tmp_path / "run", "train.keep_last=0", checkpoint=False)
    (run / "analysis.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"would remove config.yaml, metrics.jsonl, but analysis.txt were not written"):
        prepare_run_dir(run, _cfg(run, "train.keep_last=0", "train.resume=auto"), is_main=True, barrier=lambda: None)
    assert (run / "analysis.txt").read_text() == "mine" and (run / "metrics.jsonl").exists()


def test_overwrite_in_a_project_folder_deletes_nothing(tmp_path):
    """train.output_dir=. in a project holding its own config.yaml, files and sub-folders."""
    (tmp_path / "config.yaml").write_text("data: {}\n")
    (tmp_path / "notes.md").write_text("mine")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirError, match=r"would remove nothing, but no readable \.text4vpr-run\.json"):
        prepare_run_dir(tmp_path, _cfg(tmp_path, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_overwrite_keeps_nothing_it_did_not_record(tmp_path):
    """A run folder with a user's file added: overwrite refuses, naming what it would remove."""
    run = _old_run(tmp_path / "run")
    (run / "plots").mkdir()
    with pytest.raises(RunDirError, match=r"would remove checkpoints, config.yaml, metrics.jsonl, but plots were not"):
        prepare_run_dir(run, _cfg(run, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert (run / "plots").is_dir() and (run / "checkpoints" / "step-00000005").is_dir()


@pytest.mark.parametrize("wide", [False, True])
def test_a_users_figure_or_temp_file_beside_the_run_is_never_cleared(tmp_path, wide):
    """The manifest names the files a run writes, not patterns that also match a user's
    `figure.png` or `.tmp-notes`; `wide`: a manifest from before, which recorded "*.png", ".tmp-*"."""
    run = _old_run(tmp_path / "run")
    if wide:
        (run / RUN_MANIFEST).write_text(json.dumps({"written": ["config.yaml", "metrics.jsonl", "checkpoints",
                                                                "loss.png", "*.png", ".tmp-*"]}))
    (run / "loss.png").write_bytes(b"run's")
    (run / ".tmp-config.yaml.abc123").write_text("a killed write")
    (run / "my_figure_for_paper.png").write_bytes(b"mine")
    (run / ".tmp-user-notes").write_text("mine")
    with pytest.raises(RunDirError, match=r"\.tmp-user-notes, my_figure_for_paper\.png were not written"):
        prepare_run_dir(run, _cfg(run, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    (run / "my_figure_for_paper.png").unlink()
    (run / ".tmp-user-notes").unlink()
    prepare_run_dir(run, _cfg(run, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert sorted(p.name for p in run.iterdir()) == sorted(PACKAGE_FILES)


def test_a_crafted_run_manifest_names_no_path_outside(tmp_path):
    run = _old_run(tmp_path / "run")
    (tmp_path / "precious").write_text("mine")
    (run / RUN_MANIFEST).write_text(json.dumps({"written": ["../precious", "*"]}))
    with pytest.raises(RunDirError, match="no readable"):
        prepare_run_dir(run, _cfg(run, "train.overwrite=true"), is_main=True, barrier=lambda: None)
    assert (tmp_path / "precious").exists() and (run / "config.yaml").exists()


def test_a_moved_run_folder_resumes(tmp_path):
    run = _old_run(tmp_path / "run")
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    run.rename(moved)
    assert check_run_dir(moved, _cfg(moved, "train.resume=auto")) is False


def test_another_runs_checkpoint_under_another_batch_size_is_refused(tmp_path):
    other = _old_run(tmp_path / "other", "data.loader.batch_size=4")
    ckpt = other / "checkpoints" / "step-00000005"
    (ckpt / "state.json").write_text("{}")
    new = tmp_path / "new"
    with pytest.raises(RunDirError, match=r"data.loader.batch_size: 4 there, 8 now"):
        check_run_dir(new, _cfg(new, "data.loader.batch_size=8", f"train.resume={ckpt}"))
    assert check_run_dir(new, _cfg(new, "data.loader.batch_size=4", f"train.resume={ckpt}")) is False


def _holding_the_lock(run):
    """A process that holds `run`'s lock until its stdin closes (a concurrent run)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from text4vpr.train.run_dir import lock_run_dir; "
         "lock_run_dir(pathlib.Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_locked_run_folder_is_refused(tmp_path):
    """Another process holds the folder's lock (a concurrent run): refused with one line."""
    run = _old_run(tmp_path / "run")
    holder = _holding_the_lock(run)
    try:
        with pytest.raises(RunDirError, match=f"another training run is using this folder \\(it holds {LOCK_NAME}\\)"):
            prepare_run_dir(run, _cfg(run, "train.resume=auto"), is_main=True, barrier=lambda: None)
    finally:
        holder.communicate("", timeout=60)
    prepare_run_dir(run, _cfg(run, "train.resume=auto"), is_main=True, barrier=lambda: None)  # free again


def test_a_second_resume_into_a_running_folder_is_one_line(train_cache, tmp_path):
    """Two `train.resume=auto` into one folder (a requeued job beside the running one), through
    the real command line: the second stops with one line, exit 2, and writes nothing."""
    import subprocess
    import sys

    extra = [f"data.synthetic.cache_dir={train_cache}"]
    run = _old_run(tmp_path / "run", *extra)
    holder = _holding_the_lock(run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    try:
        r = subprocess.run([sys.executable, "-m", "text4vpr", "train", "--config", TINY, f"train.output_dir={run}",
                            "train.resume=auto", *extra], capture_output=True, text=True, timeout=HANG_GUARD_S)
    finally:
        holder.communicate("", timeout=60)
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "another training run is using this folder" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_real_run_records_every_file_it_writes(train_cache, tmp_path):
    """Every top-level entry a full run leaves (final evaluation, report.html) is in its manifest,
    so train.overwrite=true clears it completely."""
    out = tmp_path / "run"
    args = [f"data.synthetic.cache_dir={train_cache}", "train.max_steps=2", "eval.gallery=2"]
    Trainer(_cfg(out, *args)).train()
    from text4vpr.train.run_dir import own_entries

    cfg = _cfg(out, *args, "train.overwrite=true")
    assert own_entries(out, cfg) == sorted(p.name for p in out.iterdir() if p.name not in PACKAGE_FILES)
    shards = sorted(Path(train_cache).rglob("manifest.json"))  # what the run folder's shards/ links point to
    prepare_run_dir(out, cfg, is_main=True, barrier=lambda: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(PACKAGE_FILES)
    assert shards and all(p.is_file() for p in shards)  # links removed, never their targets
