"""The launch check: the processes an `accelerate launch` line asks for against the real world size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from text4vpr.utils.launch_check import LaunchMismatch, check_world_size, requested_processes, resolve_deepspeed_config
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
ACC = ["/usr/bin/python3", "/venv/bin/accelerate", "launch"]


@pytest.mark.parametrize("argv, asked", [
    (ACC + ["--cpu", "--num_processes", "2", "train.py"], 2),
    (ACC + ["--cpu", "--num-processes=3", "train.py", "train.epochs=1"], 3),
    (ACC + ["--cpu", "train.py"], 1),
    (["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4", "-m", "text4vpr"], 4),
    (["python", "train.py", "launch"], None),  # not an accelerate launch
    (["bash", "-c", "pytest"], None),
])
def test_requested_processes_from_the_command_line(argv, asked):
    assert requested_processes(argv) == asked


def test_requested_processes_from_a_config_file(tmp_path):
    cfg = REPO / "launch" / "accelerate_cpu_2proc.yaml"
    assert requested_processes(ACC + ["--config_file", str(cfg), "train.py"]) == 2
    assert requested_processes(ACC + ["--config_file", str(cfg), "--num_processes", "3", "train.py"]) == 3


def test_mismatch_names_the_fix():
    argv = ACC + ["--cpu", "--num_processes", "2", "train.py"]
    with pytest.raises(LaunchMismatch, match=r"asked for 2 processes but started 1 .*--cpu.*accelerate_cpu_2proc\.yaml"):
        check_world_size(argv, {})
    check_world_size(argv, {"WORLD_SIZE": "2"})  # the same line under real ranks passes
    check_world_size(["python", "train.py"], {})  # no launcher: nothing to compare


def _accelerate(*args):
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *args]


@pytest.mark.parametrize("entry", [
    [str(REPO / "train.py")],
    ["-m", "text4vpr", "eval", "--model", "m", "--shards", "s", "--out", "run"],
], ids=["train.py", "text4vpr eval"])
def test_cpu_flag_with_two_processes_stops_with_the_fix(tmp_path, entry):
    """The real launcher's single-process path: one line, exit 2, before any model is built."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_accelerate("--cpu", "--num_processes", "2", *entry, f"train.output_dir={tmp_path / 'run'}")
                       if entry[0] != "-m" else _accelerate("--cpu", "--num_processes", "2", *entry),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "asked for 2 processes but started 1" in lines[0], r.stderr[-2000:]
    ours = r.stderr.split("Traceback")[0]  # then Accelerate's own CalledProcessError (`launch -q` hides it)
    assert r.stderr.count("Traceback") <= 1 and lines[0] in ours
    assert r.stderr.count("Traceback") == 0 or "CalledProcessError" in r.stderr
    assert not (tmp_path / "run").exists()


def test_deepspeed_json_is_found_from_outside_the_checkout(tmp_path, monkeypatch):
    """launch/accelerate_deepspeed_zero2.yaml names launch/deepspeed_zero2.json relative to the
    checkout; launched from another folder, the JSON is found beside the launch config."""
    import shutil

    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    for name in ("accelerate_deepspeed_zero2.yaml", "deepspeed_zero2.json"):
        shutil.copy(REPO / "launch" / name, checkout / "launch" / name)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    named = "launch/deepspeed_zero2.json"
    for config_file in (str(checkout / "launch" / "accelerate_deepspeed_zero2.yaml"),
                        "../checkout/launch/accelerate_deepspeed_zero2.yaml"):
        env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": named}
        resolve_deepspeed_config(ACC + ["--config_file", config_file, "train.py"], env)
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(checkout / named)
    (checkout / named).unlink()
    with pytest.raises(LaunchMismatch, match=r"DeepSpeed config launch/deepspeed_zero2.json \(deepspeed_config_file of"):
        resolve_deepspeed_config(ACC + ["--config_file", config_file, "train.py"], {"ACCELERATE_DEEPSPEED_CONFIG_FILE": named})
    monkeypatch.chdir(REPO)  # in the checkout the relative path works as written: left alone
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": named}
    resolve_deepspeed_config(["python", "train.py"], env)
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == named
