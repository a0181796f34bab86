"""Ctrl-C during training: one line per rank, exit status 130, no traceback of ours."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def _interrupt_once_training(cmd, run_dir, cwd):
    """Start `cmd` in its own process group, wait for its first logged step, Ctrl-C the group."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + HANG_GUARD_S  # a guard against a hang, not a measurement
    while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    return proc.returncode, err


def _train_args(tmp_path, cache):
    return [str(REPO / "train.py"), "--config", "tiny_test", f"data.synthetic.cache_dir={cache}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=100000", "eval.every_steps=100000"]


def _stop_line(step_log: Path) -> str:
    """The line of a run stopped by Ctrl-C after its checkpoint at the last logged step."""
    step = [json.loads(ln)["step"] for ln in step_log.read_text().splitlines() if '"kind": "train"' in ln][-1]
    return f"SIGINT at step {step}: checkpoint saved in "


def test_ctrl_c_is_one_line(tmp_path):
    """With the progress bar on: the stop line is a line of its own (split on newlines only), after
    a checkpoint at the step the run stopped, and names train.resume=auto."""
    args = [*_train_args(tmp_path, tmp_path / "cache"), "train.progress=true"]
    rc, err = _interrupt_once_training([sys.executable, *args], tmp_path / "run", tmp_path)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [ln for ln in err.split("\n") if "interrupted" in ln]
    assert len(ours) == 1 and ours[0].startswith("interrupted: " + _stop_line(tmp_path / "run" / "metrics.jsonl")), err[-2000:]
    assert "train.resume=auto" in ours[0]
    step = int(ours[0].split("step ")[1].split(":")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "state.json").is_file()


@pytest.mark.slow
def test_ctrl_c_under_accelerate_is_one_line_per_rank(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
              str(REPO / "launch" / "accelerate_cpu_2proc.yaml")]
    rc, err = _interrupt_once_training(launch + _train_args(tmp_path, tmp_path / "cache"), tmp_path / "run", tmp_path)
    assert rc != 0
    ours = sorted(ln for ln in err.split("\n") if ln.startswith("interrupted"))
    stop = _stop_line(tmp_path / "run" / "metrics.jsonl")  # both ranks stopped at the same step, after one checkpoint
    assert [ln.split(":")[0] for ln in ours] == ["interrupted (rank 0)", "interrupted (rank 1)"], err[-3000:]
    assert all(stop in ln and "train.resume=auto" in ln for ln in ours), err[-3000:]
