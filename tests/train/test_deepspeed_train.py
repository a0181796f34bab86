"""DeepSpeed ZeRO-2 through Accelerate (one CPU process): trains, checkpoints, resumes exactly.

The launches run train.py through `deepspeed_cpu_worker.py`, so DeepSpeed compiles no C++ op
at test time (its CPU shared-memory all-reduce would take minutes of g++ on a fresh machine).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import HANG_GUARD_S, free_port

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("deepspeed")  # a runtime dependency; absent only in a stripped install


def _launch(cache, out, *extra, cwd=REPO):
    worker = Path(__file__).with_name("deepspeed_cpu_worker.py")  # train.py, no op compiled
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate_deepspeed_zero2.yaml"), "--num_processes", "1",
           "--main_process_port", str(free_port()), str(worker), "--config", str(REPO / "configs" / "tiny_test.yaml"),
           "train.cpu=false", "train.max_steps=4", "train.save_every_steps=2", "eval.final=false",
           "optim.schedule=constant", f"data.synthetic.cache_dir={cache}", f"train.output_dir={out}", *extra]
    extensions = Path(out).parent / "torch_extensions"  # where a JIT-compiled op would land
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not extensions.exists() or not any(extensions.rglob("*.so")), "DeepSpeed compiled an op at test time"
    return run


@pytest.mark.slow
def test_zero2_trains_and_resumes_bitwise(train_cache, tmp_path):
    _launch(train_cache, tmp_path / "full")
    _launch(train_cache, tmp_path / "cut", "train.max_steps=2")
    resumed = _launch(train_cache, tmp_path / "cut", "train.resume=auto")
    assert "resumed from" in resumed.stdout + resumed.stderr
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    step2 = tmp_path / "cut" / "checkpoints" / "step-00000002"
    assert (step2 / "pytorch_model").is_dir()  # DeepSpeed's format
    from text4vpr.train.checkpoint import deepspeed_checkpoint_types

    allowed = {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_checkpoint_types()}
    for f in [*step2.glob("pytorch_model/*.pt"), *step2.glob("*.pkl")]:  # resume read them weights_only
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f))) <= allowed, f.name
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_zero2_launch_config_works_outside_the_checkout(train_cache, tmp_path):
    """The launch config names its DeepSpeed JSON relative to the checkout; from another folder
    the trainer finds it beside the launch config (no "expected a string path" error)."""
    _launch(train_cache, tmp_path / "run", "train.max_steps=1", "train.save_every_steps=0", cwd=tmp_path)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zero2_bf16_autocast_runs(train_cache, tmp_path):
    """DeepSpeed's own bf16 is off (launch/); the engine runs the forward under torch.autocast(bf16)."""
    import json

    run = _launch(train_cache, tmp_path / "bf16", "train.mixed_precision=bf16", "train.max_steps=2", "train.save_every_steps=0")
    assert "torch_autocast section added" in run.stdout + run.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_torch_autocast_section_is_what_deepspeed_reads():
    """The section the trainer adds parses to bf16 autocast with fp32 gradient reduction;
    a user's own section is kept; fp32 runs get none."""
    import json

    from deepspeed.runtime.config import DeepSpeedConfig

    from text4vpr.train.deepspeed_config import add_torch_autocast

    cfg = json.loads((REPO / "launch" / "deepspeed_zero2.json").read_text())
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"]  # "auto" is Accelerate's to fill
    assert not add_torch_autocast(dict(cfg), "no")
    assert add_torch_autocast(cfg, "bf16")
    parsed = DeepSpeedConfig(cfg)
    assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.bfloat16
    assert parsed.torch_autocast_lower_precision_safe_modules == []
    mine = {"torch_autocast": {"enabled": False}}
    assert not add_torch_autocast(mine, "bf16") and mine == {"torch_autocast": {"enabled": False}}
    own_bf16 = {"bf16": {"enabled": True}}  # DeepSpeed's own bf16 mode: no second scheme on top
    assert not add_torch_autocast(own_bf16, "bf16") and "torch_autocast" not in own_bf16
