"""Killed (SIGKILL) mid-epoch on 1 rank and resumed on 2, and the reverse: the global batches
after the resume hold the uninterrupted run's locations (from the runs' own logs), every later
loss matches within 1e-4 relative, the final weights are reported against the reference."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.train.logs import read_metrics
from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
G = 4  # global batch in locations: 4 on 1 rank, 2 + 2 on 2
# dropout off and Adam's eps raised: see test_distributed_train.py (1 and 2 ranks then compute the same function)
COMMON = [
    "data.loader.num_workers=0", "model.config.text.dropout=0.0", "model.config.text.residual_dropout=0.0",
    "model.config.aggregation.dropout=0.0", "eval.final=false", "eval.every_steps=1000", "train.log_every_steps=1",
    "train.epochs=2", "train.max_steps=12", "train.save_every_steps=3", "optim.lr=1e-3", "optim.eps=1e-3",
    "train.log_locations=true",
]


def _cmd(cache, out, world: int, kill_at: str | None = None, resume: bool = False, batch: int | None = None):
    # the killed run: each rank runs train.py under kill_at_rename; rank 0 (the one that
    # renames checkpoints) dies just before step 6's folder goes into place, the launcher ends the rest
    killer = [str(REPO / "tests" / "kill_at_rename.py"), "before", kill_at] if kill_at else []
    launcher = TORCHRUN if world > 1 else [sys.executable]
    args = [str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.synthetic.cache_dir={cache}",
            f"train.output_dir={out}", f"data.loader.batch_size={batch or G // world}", *COMMON]
    return [*launcher, *killer, *args] + (["train.resume=auto"] if resume else [])


def _run(cmd, expect_kill: bool = False):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    if expect_kill:
        assert proc.returncode != 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(run: Path, kind: str) -> dict[int, object]:
    """step -> the run's own record (the last one per step: a resume truncates and rewrites)."""
    field = "locations" if kind == "batch" else "loss"
    return {e["step"]: e[field] for e in read_metrics(run / "metrics.jsonl") if e["kind"] == kind}


def test_a_resume_keeps_the_global_batch_or_refuses_naming_valid_rank_counts():
    from text4vpr.config import ConfigError
    from text4vpr.data.loader import LoaderConfig, LoaderError
    from text4vpr.train.elastic import resumed_loader

    said = []
    cfg = LoaderConfig(batch_size=4)
    saved = {"global_batch": 12, "world_size": 3}
    assert resumed_loader(None, cfg, 2, said.append) is cfg  # a fresh run: the config's batch
    assert resumed_loader(saved, cfg, 2, said.append).batch_size == 6
    assert said == ["resuming on 2 rank(s): the run's global batch of 12 locations is 6 per rank "
                    "(data.loader.batch_size=4 is ignored; it was 4 on 3 rank(s))"]
    assert resumed_loader(saved, cfg, 3, said.append).batch_size == 4 and len(said) == 1  # same world: silent
    with pytest.raises(LoaderError, match="global batch of 12 locations cannot be split over 5 ranks; run on 1, 2, 3, 4, 6, 12 ranks"):
        resumed_loader(saved, cfg, 5, said.append)
    fixed = LoaderConfig(batch_size=4, fixed_shard_assignment=True)
    with pytest.raises(ConfigError, match="fixed_shard_assignment=true: the saved run's order belongs to 3 rank"):
        resumed_loader(saved, fixed, 2, said.append)


@pytest.fixture(scope="module")
def reference(train_cache, tmp_path_factory):
    """The uninterrupted run (1 rank; the same global batches on any number)."""
    ref = tmp_path_factory.mktemp("elastic") / "ref"
    _run(_cmd(train_cache, ref, 1))
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(1, 2), (2, 1)])
def test_kill_on_one_world_resume_on_another_continues_exactly(train_cache, reference, tmp_path, first, then):
    ref = reference
    cut = tmp_path / "cut"
    _run(_cmd(train_cache, cut, first, kill_at=glob.escape(str(cut / "checkpoints" / "step-00000006"))), expect_kill=True)
    saved = sorted((cut / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000003"]  # killed mid-epoch, after step 3's checkpoint
    state = json.loads((saved[-1] / "state.json").read_text())
    assert (state["global_batch"], state["world_size"], state["batch_in_epoch"]) == (G, first, 3)
    # the same command (config) as the killed run, on another world size: G comes from the checkpoint
    resumed = _run(_cmd(train_cache, cut, then, resume=True, batch=G // first))
    assert f"the run's global batch of {G} locations is {G // then} per rank" in resumed.stdout + resumed.stderr
    if then > first:
        assert "the data order continues at the next global batch" in resumed.stderr

    want, got = _log(ref, "batch"), _log(cut, "batch")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in range(4, 13):  # after the resume: the same locations in every global batch
        assert sorted(got[step]) == sorted(want[step]), step
    epoch0 = [i for s in range(1, 9) for i in got[s]]
    assert len(epoch0) == len(set(epoch0)) == 8 * G  # each location once per epoch, across the resume

    loss_ref, loss_cut = _log(ref, "train"), _log(cut, "train")
    for step in range(4, 13):
        assert abs(loss_cut[step] - loss_ref[step]) <= 1e-4 * abs(loss_ref[step]), (step, loss_cut[step], loss_ref[step])
    a = load_file(ref / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    # relative to each tensor's norm; the floor covers tensors that stay ~0 (zero true gradient, see above)
    rel = {k: float((b[k].double() - a[k].double()).norm()) / (float(a[k].double().norm()) + 1e-7 * a[k].numel() ** 0.5)
           for k in a}
    worst = max(rel, key=rel.get)
    print(f"\nkilled on {first} rank(s), resumed on {then}: largest relative weight difference {rel[worst]:.2e} ({worst})")
    assert rel[worst] < 1e-3
