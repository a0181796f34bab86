"""A real 2-rank gloo run (plain, or gradient-cached) equals a 1-rank run with the same global batch (fp32, CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.train.logs import read_metrics
from tests.helpers import assert_close_by_norm

REPO = Path(__file__).resolve().parents[2]

# One shard and no shuffle buffer: rank r of 2 reads samples r, r+2, ... so global batch j
# of the 2-rank run holds the same locations as batch j of the 1-rank run. Dropout off, so
# both runs compute the same function; BatchNorm statistics span both ranks. Adam's eps is
# raised because several parameters have an exactly zero true gradient (attention key
# biases, length-1 attention q/k, the bias before BatchNorm, Sinkhorn row shifts): there the
# gradient is pure summation-order noise (~1e-10), which Adam with eps=1e-8 turns into ±lr
# steps that differ between any two summation orders, one process or two.
COMMON = [
    "data.synthetic.shard_size=1000", "data.loader.shuffle_buffer=1", "data.loader.num_workers=0",
    "model.config.text.dropout=0.0", "model.config.text.residual_dropout=0.0", "model.config.aggregation.dropout=0.0",
    "eval.final=false", "eval.every_steps=100", "train.log_every_steps=1",
    "train.max_steps=3", "optim.lr=1e-3", "optim.eps=1e-3", "loss.learnable=true",
]


def _cmd(cache, out, launcher, batch):
    return [*launcher, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_test.yaml"),
            f"data.synthetic.cache_dir={cache}", f"train.output_dir={out}", f"data.loader.batch_size={batch}", *COMMON]


def _ckpt(run):
    return load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors")


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, train_cache):
    one = subprocess.run(_cmd(train_cache, tmp_path / "one", [sys.executable], 4), cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    # "two_cached": gradient caching in 2 micro-batches per rank, BatchNorm over the whole
    # global batch and gradients averaged by hand: still the 1-rank plain run
    for run, extra in (("two", []), ("two_cached", ["train.micro_batches=2"])):
        two = subprocess.run(_cmd(train_cache, tmp_path / run, torchrun, 2) + extra, cwd=REPO, capture_output=True, text=True)
        assert two.returncode == 0, two.stderr[-3000:]
    a = _ckpt(tmp_path / "one")
    losses = _losses(tmp_path / "one")
    assert len(losses) == 3
    for run in ("two", "two_cached"):
        b = _ckpt(tmp_path / run)
        assert a.keys() == b.keys()
        for k in a:  # relative to each tensor's norm; the floor covers tensors that stay ~0
            assert_close_by_norm(b[k], a[k], rel=1e-5, floor=1e-7, name=f"{run}: {k}")
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / run)), torch.tensor(losses), rtol=1e-5, atol=0)


def _losses(run):
    return [e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == "train"]


@pytest.mark.slow
def test_two_rank_cached_training_equals_uncached_and_each_rank_caches_its_share(tmp_path, train_cache):
    """Frozen-trunk cache under DDP: bitwise the uncached run; with fixed_shard_assignment
    rank 0 caches only the locations of its own shards, epoch after epoch."""
    import json

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    extra = ["data.synthetic.shard_size=4", "data.loader.fixed_shard_assignment=true", "train.epochs=3",
             "train.max_steps=0", "eval.final=false", "model.config.image.num_layers=3"]
    runs = {}
    for name, more in (("plain", []), ("cached", ["train.frozen_cache=true"])):
        cmd = _cmd(train_cache, tmp_path / name, torchrun, 2)[:-len(COMMON)] + ["data.loader.num_workers=0", *extra, *more]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    for k in runs["plain"]:
        assert torch.equal(runs["cached"][k], runs["plain"][k]), k
    stats = [e for e in read_metrics(tmp_path / "cached" / "metrics.jsonl") if e["kind"] == "frozen_cache"][-1]  # the last
    shard_dirs = list(Path(train_cache).glob("synth-n48-*-shard4/shards/train"))
    total = sum(s["count"] for s in json.loads((shard_dirs[0] / "manifest.json").read_text())["shards"])
    assert stats["hits"] > 0 and stats["misses"] == stats["locations"]
    assert 0 < stats["locations"] <= total // 2 + 4  # rank 0's shards (half of them, 4 locations each)
