"""`text4vpr synth` writes a tokenizer and prints commands that, pasted as printed, train on its output."""

import os
import shlex
import subprocess
import sys
from pathlib import Path
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_printed_commands_train_on_the_synth_output(tmp_path):
    out = _run([sys.executable, "-m", "text4vpr", "synth", "--out", "my synth", "--locations", "40",
                "--image-size", "32", "--no-progress"], tmp_path)
    assert (tmp_path / "my synth" / "tokenizer" / "tokenizer.json").is_file()
    printed = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("text4vpr ")]
    assert len(printed) == 4 and printed[-1].startswith("text4vpr train")
    for line in printed:  # exactly as printed (quoting included), a tiny run for the last one
        argv = shlex.split(line)
        extra = ["train.max_steps=2", "eval.final=false", "train.progress=false", "data.loader.num_workers=0",
                 "data.loader.batch_size=4"] if argv[1] == "train" else ["--no-progress"]
        _run([sys.executable, "-m", "text4vpr", *argv[1:], *extra], tmp_path)
    assert (tmp_path / "my synth" / "run" / "model" / "model.safetensors").is_file()
