"""`--help` of every command says what it does and each option's default; the resolved config
can be printed with every key and read back."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from text4vpr.cli import build_parser
from text4vpr.config import to_dict
from text4vpr.train import resolve_config
from text4vpr.train.config import RunConfig
from text4vpr.utils.mapping import flatten
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def _all_parsers(parser, name="text4vpr"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_command_has_a_description_and_shows_defaults():
    seen = []
    for name, parser in _all_parsers(build_parser()):
        seen.append(name)
        text = parser.format_help()
        assert parser.description and "".join(parser.description.split()) in "".join(text.split()), name
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                shown = " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""
                assert "default" in shown, f"{name} {action.option_strings[0]}: default {action.default!r} not shown"
    for cmd in ("shards build", "shards inspect", "index build", "index queries", "config show", "train", "synth"):
        assert f"text4vpr {cmd}" in seen


def _run(*cmd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_print_config_shows_every_key_and_reads_back(tmp_path):
    printed = _run(str(REPO / "train.py"), "--config", "street360loc", "optim.lr=0.5", "--print-config")
    data = yaml.safe_load(printed)
    def keys(d):  # model.config holds the preset's overrides: free-form below that key
        return {k for k in flatten(d) if not k.startswith("model.config")}

    assert keys(data) == keys(to_dict(RunConfig()))  # every key, none extra
    assert "pretrained" in data["model"]["config"]["image"]  # the file's overrides kept
    assert data["optim"]["lr"] == 0.5
    (tmp_path / "printed.yaml").write_text(printed)
    assert resolve_config(str(tmp_path / "printed.yaml"), []) == resolve_config("street360loc", ["optim.lr=0.5"])
    assert _run("-m", "text4vpr", "config", "show", "--config", "street360loc", "optim.lr=0.5") == printed


def test_help_imports_no_torch(tmp_path):
    """`text4vpr --help` and every subcommand's `--help` build the parser with a torch that
    cannot be imported (a stub first on the path raises on import)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported by --help')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    for cmd in ([], ["train"], ["eval"], ["index", "build"], ["localize"], ["shards", "build"], ["config", "show"]):
        r = subprocess.run([sys.executable, "-m", "text4vpr", *cmd, "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert r.returncode == 0 and "usage: text4vpr" in r.stdout, (cmd, r.stderr[-2000:])
    r = subprocess.run([sys.executable, "-c", "import torch"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    assert "torch imported by --help" in r.stderr  # the stub is the torch these runs would import
