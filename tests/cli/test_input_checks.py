"""Impossible numbers and wrong paths, fed to the real command line: exit status 2, one line
naming the key, flag or path, and nothing written (so the corrected command just runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
T4 = [sys.executable, "-m", "text4vpr"]
TRAIN = [*T4, "train", "train.output_dir=run"]
BUILD = [*T4, "shards", "build", "--xlsx", "a.xlsx", "--images", "imgs", "--out", "o"]


def _setup(tmp: Path) -> None:
    (tmp / "dup.yaml").write_text("train:\n  epochs: 1\n  seed: 2\n  epochs: 3\n")
    (tmp / "a.xlsx").write_bytes(b"")
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "000001_1.jpg").write_bytes(b"")
    (tmp / "afile").write_text("mine")


CASES = [  # (name, command, what the one line must say)
    ("batch size 0", TRAIN + ["data.loader.batch_size=0"], r"data.loader.batch_size: 0 is out of range \(must be >= 1\)"),
    ("negative lr", TRAIN + ["optim.lr=-1"], r"optim.lr: -1.0 is out of range \(must be > 0\)"),
    ("nan lr", TRAIN + ["optim.lr=nan"], r"optim.lr: nan is not a finite number"),
    ("zero temperature", TRAIN + ["loss.temperature=0"], r"loss.temperature: 0.0 is out of range"),
    ("ks 0 and -1", TRAIN + ["eval.ks=[0,-1]"], r"eval.ks\[0\]: 0 is out of range \(must be >= 1\)"),
    ("negative radius", TRAIN + ["eval.radii=[5,-1]"], r"eval.radii\[1\]: -1.0 is out of range \(must be > 0\)"),
    ("nan radius", TRAIN + ["eval.radii=[.nan]"], r"eval.radii\[0\]: nan is not a finite number"),
    ("negative epochs", TRAIN + ["train.epochs=-1"], r"train.epochs: -1 is out of range"),
    ("duplicate yaml key", [*T4, "train", "--config", "dup.yaml"], r"dup.yaml: .*key 'epochs' given twice \(lines 2 and 4\)"),
    ("missing tokenizer folder", TRAIN + ["data.loader.tokenizer=tok/t5-base"],
     r"data.loader.tokenizer=tok/t5-base: no such folder; give a local folder"),
    ("missing backbone folder", TRAIN + ["model.config.image.pretrained=/models/dinov2-base"],
     r"model.config.image.pretrained=/models/dinov2-base: no such folder"),
    ("backbone folder is a file", TRAIN + ["model.config.text.pretrained=afile"],
     r"model.config.text.pretrained=afile: a file, not a folder"),
    ("no train shards", TRAIN + ["data.synthetic.locations=0"], r"data.train_shards: not set"),
    ("missing train shards", TRAIN + ["data.synthetic.locations=0", "data.train_shards=shards/train",
                                      "data.val_shards=imgs"], r"data.train_shards=shards/train: no such folder"),
    ("no tokenizer for real shards", TRAIN + ["data.synthetic.locations=0", "data.train_shards=a.tar::b.tar",
                                              "data.val_shards=c.tar::d.tar"], r"data.loader.tokenizer: not set"),
    ("output dir is a file", [*T4, "train", "train.output_dir=afile"], r"train.output_dir=afile: a file, not a folder"),
    ("unknown model key", TRAIN + ["model.config.image.pretraned=x"], r"model.config.image.pretraned"),
    ("resize -3", BUILD + ["--resize", "-3"], r"argument --resize: must be between 8 and 16384, got -3"),
    ("jpeg quality 500", BUILD + ["--jpeg-quality", "500"], r"argument --jpeg-quality: must be between 1 and 95, got 500"),
    ("skipped share 2", BUILD + ["--max-skipped-share", "2"], r"argument --max-skipped-share: must be between 0 and 1"),
    ("shard out is a file", [*T4, "shards", "build", "--xlsx", "a.xlsx", "--images", "imgs", "--out", "afile"],
     r"argument --out: afile is a file, not a folder"),
    ("eval out is a file", [*T4, "eval", "--model", "m", "--shards", "s", "--out", "afile"],
     r"argument --out: afile is a file, not a folder"),
    ("index out is a file", [*T4, "index", "build", "--model", "m", "--shards", "s", "--out", "afile"],
     r"argument --out: afile is a file, not a folder"),
    ("queries out is a folder", [*T4, "index", "queries", "--model", "m", "--shards", "s", "--out", "imgs"],
     r"argument --out: imgs is a folder, not a file"),
    ("eval k 0", [*T4, "eval", "--model", "m", "--shards", "s", "--out", "r", "--ks", "0"], r"argument --ks: must be at least 1"),
    ("eval radius nan", [*T4, "eval", "--model", "m", "--shards", "s", "--out", "r", "--radii", "nan"],
     r"argument --radii: must be a finite number"),
]


@pytest.mark.parametrize("name, cmd, says", CASES, ids=[c[0] for c in CASES])
def test_impossible_input_is_one_line_and_writes_nothing(tmp_path, name, cmd, says):
    _setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and re.search(says, errors[0]), r.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no run folder, no cache
