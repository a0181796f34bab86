"""`text4vpr train` is the demo: the same thread rule and the same model, byte for byte, as
`accelerate launch train.py` (OMP_NUM_THREADS unset: one thread per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
THREADS = "CPU threads per process: 1 (OMP_NUM_THREADS=1)"


@pytest.mark.slow
def test_text4vpr_train_and_accelerate_launch_give_the_same_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))  # no user accelerate config
    demo = ["data.synthetic.locations=120", "train.max_steps=4", "train.progress=false", "eval.final=false",
            f"data.synthetic.cache_dir={tmp_path / 'cache'}"]
    commands = {"text4vpr": [sys.executable, "-m", "text4vpr", "train"],
                "accelerate": [sys.executable, "-m", "accelerate.commands.launch", str(REPO / "train.py")]}
    models = {}
    for name, cmd in commands.items():
        out = tmp_path / name
        r = subprocess.run([*cmd, *demo, f"train.output_dir={out}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=HANG_GUARD_S)
        assert r.returncode == 0, r.stderr[-3000:]
        assert THREADS in r.stdout, (name, r.stdout[-2000:])
        models[name] = (out / "model" / "model.safetensors").read_bytes()
    assert models["text4vpr"] == models["accelerate"]
