"""Each newcomer's mistake, fed to the real command line: one line naming the file, key or
flag and the fix, exit status 2, no traceback (and `--debug` brings the traceback back)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
TEXT4VPR = [sys.executable, "-m", "text4vpr"]
TRAIN = [sys.executable, str(REPO / "train.py")]


def _setup(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
    (tmp / "empty").mkdir()
    (tmp / "imgs").mkdir()
    (tmp / "a.xlsx").write_bytes(b"")


# (name, command, what the one line must say); all fail before any model or data is built
CASES = [
    ("missing config", TRAIN + ["--config", "nope.yaml"], r"--config nope.yaml: no such file \(packaged configs: demo"),
    ("malformed yaml", TRAIN + ["--config", "bad.yaml"], r"bad.yaml: not valid YAML at line \d+, column \d+ .*fix the file"),
    ("unknown preset", TRAIN + ["model.preset=huge"], r"command line \(model.preset=huge\): model.preset: unknown value 'huge' \(expected one of: tiny \| paper \| custom\)"),
    ("typo on the command line", [*TEXT4VPR, "train", "train.epocs=3"], r"^error: command line \(train.epocs=3\): unknown config key in 'train': train.epocs"),
    ("resume a missing checkpoint", TRAIN + ["--resume", "runs/nope", "train.output_dir=out"], r"train.resume=runs/nope: not a complete checkpoint folder"),
    ("eval on a missing shard folder", [*TEXT4VPR, "eval", "--model", "m", "--shards", "shards/nope", "--out", "r"], r"--shards shards/nope: no such folder"),
    ("index on an empty folder", [*TEXT4VPR, "index", "build", "--model", "m", "--shards", "empty", "--out", "i"], r"--shards empty: no shards \(\*\.tar\)"),
    ("synth with negative locations", [*TEXT4VPR, "synth", "--out", "s", "--locations", "-5"], r"argument --locations: must be at least 1, got -5"),
    ("shards from a missing image folder", [*TEXT4VPR, "shards", "build", "--xlsx", "a.xlsx", "--images", "WRONG_DIR", "--out", "o"], r"--images WRONG_DIR: no such folder"),
    ("shards from a folder without views", [*TEXT4VPR, "shards", "build", "--xlsx", "a.xlsx", "--images", "imgs", "--out", "o"], r"--images imgs: no \{index:06d\}_\{pos\}.jpg views"),
]


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.parametrize("name, cmd, says", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clear_line(tmp_path, name, cmd, says):
    import re

    _setup(tmp_path)
    r = _run(cmd, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and re.search(says, errors[0].split("error: ", 1)[-1] if "^" not in says else errors[0]), r.stderr
    assert "demo.yaml" not in errors[0]  # a command-line mistake is never blamed on the default file


def test_debug_shows_the_traceback(tmp_path):
    r = _run([*TEXT4VPR, "--debug", "train", "--config", "nope.yaml"], tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
