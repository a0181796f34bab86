"""The README's commands after the demo (eval, index, localize) run as typed on what the demo
leaves in runs/demo/: a shortened demo (fewer locations, one epoch) in a fresh folder, then
each command parsed from README.md exactly as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
MARKER = "After the demo, these run as typed"
SHORT_DEMO = ["data.synthetic.locations=60", "train.epochs=1", "train.progress=false"]


def readme_after_demo() -> list[str]:
    """The commands of the first ```bash block after MARKER (backslash continuations joined)."""
    text = (REPO / "README.md").read_text()
    assert MARKER in text, f"README.md lost the sentence {MARKER!r} that introduces the commands"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, f"{' '.join(argv)}\n{(done.stdout + done.stderr)[-3000:]}"
    return done


@pytest.mark.slow
def test_readme_commands_after_the_demo_run_as_typed(tmp_path):
    commands = readme_after_demo()
    assert [shlex.split(c)[:2] for c in commands] == [["text4vpr", "eval"], ["text4vpr", "index"],
                                                      ["text4vpr", "localize"]]
    _run([sys.executable, str(REPO / "train.py"), *SHORT_DEMO], tmp_path)  # the demo: `accelerate launch train.py`
    demo = tmp_path / "runs" / "demo"
    assert (demo / "best_model" / "model.safetensors").is_file() and (demo / "per_query.jsonl").is_file()
    for split in ("train", "val", "test"):  # links into the cache, relative: the checkout can move
        assert (demo / "shards" / split).is_symlink() and not os.path.isabs(os.readlink(demo / "shards" / split))
        assert (demo / "shards" / split / "manifest.json").is_file()
    for command in commands:  # exactly as typed; `text4vpr` is this interpreter's `-m text4vpr`
        _run([sys.executable, "-m", "text4vpr", *shlex.split(command)[1:]], tmp_path)
    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    assert metrics["num_queries"] == 9 and (demo / "eval" / "report.html").is_file()
    assert len((demo / "eval" / "per_query.jsonl").read_text().splitlines()) == 9
    assert json.loads((demo / "index" / "header.json").read_text())["count"] == 9
    assert "not in the shards" not in (demo / "where.html").read_text()  # thumbnails found via the link


def test_gitignore_covers_what_the_readme_commands_leave():
    """Every folder the README's commands write into the checkout is ignored by git."""
    text = (REPO / "README.md").read_text()
    written = set()
    for flag in ("--out", "--output-dir", "--html"):
        written |= {m.split("/")[0] for m in re.findall(rf"{flag} ([\w.-]+/[\w./-]*)", text)}
    written |= {m.split("/")[0] for m in re.findall(r"train\.output_dir=([\w.-]+/)", text)}
    assert {"runs", "synth", "index", "reports", "models", "shards"} <= written | {"synth", "runs"}
    probe = [f"{top}/probe/x" for top in sorted(written | {"synth", ".cache"})]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probe], cwd=REPO, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(probe), f"not ignored: {set(probe) - set(ignored.stdout.split())}"
