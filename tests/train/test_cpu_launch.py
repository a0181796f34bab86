"""launch/accelerate_cpu_2proc.yaml, as the README prints it, starts two real CPU ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_config_file_starts_two_ranks(tmp_path, train_cache):
    """launch/accelerate_cpu_2proc.yaml gives two real gloo ranks (the report says so)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(REPO / "launch" / "accelerate_cpu_2proc.yaml"),
                                   str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_test.yaml"),
                                   f"data.synthetic.cache_dir={train_cache}", f"train.output_dir={out}",
                                   "train.max_steps=2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "- processes: 2" in (out / "report.md").read_text()
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # quiet: DDP's grad-strides warning is explained in docs/cli.md
