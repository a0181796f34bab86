"""Training from shards at http://127.0.0.1:PORT (nginx, a fault proxy in front) equals training
from the local folders bitwise; a shard that cannot be read stops both ranks of a gloo run with
one line each, or (on_error=skip) both ranks say how many samples were skipped."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.train import resolve_config
from text4vpr.train.data import ensure_synthetic, synthetic_root
from text4vpr.train.logs import read_metrics
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
GUARD_S = 60  # hang guard for the failing 2-rank runs (they end in a few seconds once started)
COMMON = ["train.max_steps=3", "eval.final=false", "eval.every_steps=100", "data.loader.num_workers=1",
          "data.loader.remote_stall_s=1.0", "data.loader.remote_timeout_s=30", "data.synthetic.shard_size=8"]


def _base(cache):
    return ["--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.synthetic.cache_dir={cache}"]


@pytest.fixture(scope="module")
def shard_root(train_cache):
    """The tiny config's synthetic shards (train/val/test folders, 8 locations a shard) and tokenizer."""
    args = _base(train_cache) + COMMON
    cfg = resolve_config(args[1], args[2:])
    root = synthetic_root(cfg.data)
    ensure_synthetic(root, cfg.data.synthetic)
    return root


def _folders(base: str, root: Path, out: Path, *extra) -> list[str]:
    return ["data.synthetic.locations=0", f"data.train_shards={base}/train", f"data.val_shards={base}/val",
            f"data.test_shards={base}/test", f"data.loader.tokenizer={root / 'tokenizer'}", f"train.output_dir={out}",
            *COMMON, *extra]


def _train(cache, base, root, out, *extra):
    args = _base(cache) + _folders(base, root, out, *extra)
    Trainer(resolve_config(args[1], args[2:])).train()
    return load_file(out / "model" / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_from_nginx_and_through_faults_equals_training_from_the_folder(
        train_cache, shard_root, nginx, fault_proxy, http_faults, tmp_path):
    # one whole epoch: the loader reads the next batch ahead, and a read ahead cut off by a run that
    # stops mid-epoch would leave its path requested once
    epoch = "train.max_steps=0"
    local = _train(train_cache, str(shard_root / "shards"), shard_root, tmp_path / "local", epoch)
    url = nginx.serve(shard_root / "shards", "run")
    _assert_same_weights(_train(train_cache, url, shard_root, tmp_path / "http", epoch), local)
    proxy = fault_proxy(http_faults.FailEachOnce(), stall_s=4.0)
    _assert_same_weights(_train(train_cache, proxy.url("run"), shard_root, tmp_path / "faulty", epoch), local)
    assert {kind for _, kind in proxy.faults} == set(http_faults.FAULTS)
    assert all(n >= 2 for n in proxy.seen.values())  # every request failed once, then succeeded


def _torchrun(cache, base, root, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "train.py"), *_base(cache), *_folders(base, root, out, *extra),
           "data.loader.num_workers=0", "data.loader.batch_size=2"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=GUARD_S)


@pytest.mark.slow
def test_a_shard_failing_on_one_rank_stops_both_ranks_with_one_line(train_cache, shard_root, nginx, fault_proxy,
                                                                    http_faults, tmp_path):
    nginx.serve(shard_root / "shards", "twor")
    proxy = fault_proxy(http_faults.fail_always("train/shard-000001.tar", "503"))
    fast = ["data.loader.remote_retries=1", "data.loader.remote_timeout_s=5", "train.max_steps=12"]
    run = _torchrun(train_cache, proxy.url("twor"), shard_root, tmp_path / "raise", *fast)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode != 0 and len(errors) == 2, run.stderr[-3000:]
    assert all(re.fullmatch(r"error: http://\S+/twor/train/shard-000001\.tar: (sample \S+: RemoteReadError: \S+: )?"
                            r"unreadable after 2 tries .*", e) for e in errors), errors

    run = _torchrun(train_cache, proxy.url("twor"), shard_root, tmp_path / "skip", *fast, "data.loader.on_error=skip")
    assert run.returncode == 0, run.stderr[-3000:]
    # a global batch whose share on one rank is all of the failing shard is dropped on both ranks (here:
    # once in epoch 1); the shared totals, epoch by epoch, are the same sequence on both ranks
    said = re.findall(r"rank (\d): epoch (\d): (\d+) samples skipped so far on all ranks.*", run.stdout)
    totals = {r: [(e, int(n)) for rr, e, n in said if rr == r] for r in ("0", "1")}
    assert totals["0"] == totals["1"] and totals["0"] and all(n > 0 for _, n in totals["0"]), run.stdout[-3000:]
    dropped = [line for line in run.stdout.splitlines() if "global batches dropped whole" in line]
    assert {line.split(":")[0] for line in dropped} == {"rank 0", "rank 1"}, run.stdout[-3000:]
    events = read_metrics(tmp_path / "skip" / "metrics.jsonl")  # the dropped batch is a step without an update
    assert [e["step"] for e in events if e["kind"] == "dropped_batch"] and max(e["step"] for e in events) == 12
