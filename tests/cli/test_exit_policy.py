"""One exit policy, through the real command line: a user's mistake is one `error:` line, exit 2,
nothing written (`--debug`: the traceback); a bug shows its traceback; a closed pipe is quiet."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
TEXT4VPR = [sys.executable, "-m", "text4vpr"]
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def _setup(tmp: Path) -> None:
    import torch

    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "badmodel").mkdir()
    (tmp / "badmodel" / "config.json").write_text("{truncated")  # found from outside: a JSONDecodeError traceback
    (tmp / "shards").mkdir()
    (tmp / "shards" / "shard-000000.tar").write_bytes(b"")  # passes the folder check; the model is missing
    torch.save({"x": _Evil()}, tmp / "evil.pth")


class _Evil:
    """A pickled object that is not a tensor: refused by weights-only loading."""


# (name, argv after the program, extra environment, what the one line must say); each
# subcommand at least once; run with and without --debug
MISTAKES = [
    ("synth into a file's subfolder", ["synth", "--out", "afile/sub", "--locations", "3"], {}, r"afile/sub\S*: Not a directory"),
    ("shards build without images", ["shards", "build", "--xlsx", "a.xlsx", "--images", "nope", "--out", "o"], {},
     r"--images nope: no such folder"),
    ("shards inspect a missing folder", ["shards", "inspect", "nope"], {}, r"nope/manifest.json: no manifest"),
    ("convert a pickle", ["convert-upstream", "evil.pth", "--dinov2", "d", "--t5", "t", "--out", "o"], {},
     r"evil.pth: refused to unpickle \(.*_Evil\)"),
    ("convert a folder", ["convert-upstream", "adir", "--dinov2", "d", "--t5", "t", "--out", "o"], {}, r"adir: Is a directory"),
    ("index without a model", ["index", "build", "--model", "m", "--shards", "shards", "--out", "o"], {},
     r"m/config.json not found: not a text4vpr model folder"),
    ("eval with a broken model config", ["eval", "--model", "badmodel", "--shards", "shards", "--out", "o"], {},
     r"badmodel/config.json: unreadable \(.*\): not a text4vpr model folder"),
    ("eval without a model", ["eval", "--model", "m", "--shards", "shards", "--out", "o"], {}, r"m/config.json not found"),
    ("eval-embeddings of a missing file", ["eval-embeddings", "--queries", "q.safetensors", "--database", "d", "--out", "o"], {},
     r"q.safetensors: no such file"),
    ("eval-embeddings of a non-safetensors file", ["eval-embeddings", "--queries", "afile", "--database", "d", "--out", "o"], {},
     r"afile: not a safetensors file \(.*\); pass one written by `text4vpr index queries`"),
    ("localize on cuda without one", ["localize", "--model", "m", "--index", "i", "--text", "a", "--device", "cuda"], NO_GPU,
     r"--device cuda: (this torch has no CUDA|no GPU is visible) on this machine; use --device cpu"),
    ("train with a typo", ["train", "train.epocs=3", "train.output_dir=o"], {}, r"unknown config key in 'train': train.epocs"),
    ("config show with a typo", ["config", "show", "train.epocs=3"], {}, r"unknown config key in 'train': train.epocs"),
    # a launch this machine cannot honour (issue 28, item 4), refused before the run folder exists
    ("DeepSpeed launch config on a CPU machine", ["train", "train.output_dir=o"],
     {**NO_GPU, "ACCELERATE_USE_DEEPSPEED": "true"}, r"DeepSpeed launch config with train.cpu=true \(the demo's default\): Accelerate would train without DeepSpeed"),
    ("more processes than cores", ["train", "train.cpu=false", "train.output_dir=o"],
     {**NO_GPU, "LOCAL_WORLD_SIZE": str((os.cpu_count() or 1) + 1)}, r"processes on \d+ CPU cores and no GPU"),
    ("DeepSpeed JSON relative to another folder", ["train", "train.cpu=false", "train.output_dir=o"],
     {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "launch/deepspeed_zero2.json"},
     r"DeepSpeed config launch/deepspeed_zero2.json: no such file from .* give its absolute path"),
]


def _run(argv, cwd, env=None, stdout=subprocess.PIPE):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(argv, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=HANG_GUARD_S)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("name, argv, env, says", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_and_debug_shows_the_traceback(tmp_path, name, argv, env, says, debug):
    _setup(tmp_path)
    before = _listing(tmp_path)
    r = _run(TEXT4VPR + (["--debug"] if debug else []) + argv, tmp_path, env)
    assert _listing(tmp_path) == before  # nothing written, so the corrected command just runs
    if debug:
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
        assert not any(ln.startswith("error: ") for ln in r.stderr.splitlines()), r.stderr[-3000:]
        return
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(says, lines[0]), r.stderr[-3000:]


def test_train_py_takes_debug_after_its_arguments(tmp_path):
    r = _run([sys.executable, str(REPO / "train.py"), "train.epocs=3", "--debug"], tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr, r.stderr[-3000:]


def test_a_bug_shows_its_traceback(tmp_path):
    """A programming error is no user mistake: the traceback, exit 1, with or without --debug."""
    code = ("import sys, text4vpr.cli.train as t\n"
            "def broken(*args): return 1 / 0\n"
            "t.print_config = broken\n"
            "from text4vpr.cli import main\n"
            "sys.exit(main(['config', 'show']))\n")
    r = _run([sys.executable, "-c", code], tmp_path)
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr and "Traceback" in r.stderr, r.stderr[-3000:]
    assert "error: " not in r.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`text4vpr config show | head -0`: the reader is gone before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = _run(TEXT4VPR + ["config", "show"], tmp_path, stdout=write)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr[-3000:]


def test_a_full_output_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        r = _run(TEXT4VPR + ["config", "show"], tmp_path, stdout=full)
    # a print that overflows stdout's buffer fails unnamed; the final flush names <stdout>
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.fullmatch(r"error: (<stdout>|writing output): No space left on device", r.stderr.strip()), r.stderr[-3000:]


def test_os_errors_name_the_path():
    import errno

    from text4vpr.cli.errors import user_message

    assert user_message(PermissionError(errno.EACCES, "Permission denied", "/runs/x")) == "/runs/x: Permission denied"
    assert user_message(OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors")) == \
        "/runs/x/model.safetensors: No space left on device"
    assert user_message(OSError(errno.EBADF, "Bad file descriptor")) is None  # ours, not the user's: a traceback
