"""Ctrl-C during training: one line per rank, exit status 130, no traceback of ours."""

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


def test_ctrl_c_is_one_line(tmp_path):
    rc, err = _interrupt_once_training([sys.executable, *_train_args(tmp_path, tmp_path / "cache")], tmp_path / "run", tmp_path)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == ["interrupted"]


@pytest.mark.slow
def test_ctrl_c_under_accelerate_is_one_line_per_rank(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
              str(REPO / "launch" / "accelerate_cpu_2proc.yaml")]
    rc, err = _interrupt_once_training(launch + _train_args(tmp_path, tmp_path / "cache"), tmp_path / "run", tmp_path)
    assert rc != 0
    ours = sorted(ln for ln in err.splitlines() if ln.startswith("interrupted"))
    assert ours == ["interrupted (rank 0)", "interrupted (rank 1)"], err[-3000:]
