"""`train.data.agreed_batches` under on_error=skip: a global batch of which any rank holds no
sample is dropped on every rank (yielded as None) and its samples counted as skipped; the
totals every rank prints are the same (checked against a loop over the whole table); the
trainer takes a dropped batch as a step without an update."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_torchrun
from tests.train.agreed_worker import PER, kept_table, run


def reference(kept, rank: int) -> dict:
    """Per global batch: dropped when any share is empty, else this rank's samples; running totals."""
    sizes, totals, total = [], [], 0
    for row in kept.tolist():
        dropped = min(row) == 0
        skipped = len(row) * PER if dropped else sum(PER - k for k in row)
        sizes.append(None if dropped else row[rank])
        if skipped:
            total += skipped
            totals.append(total)
    return {"sizes": sizes, "totals": totals}


def test_one_rank_drops_its_empty_batches_and_counts_them():
    kept = kept_table(1)
    assert (kept == 0).any() and (kept > 0).any()  # the table holds both kinds
    assert run(0, 1) == reference(kept, 0)


@pytest.mark.slow
def test_two_ranks_drop_the_same_global_batches_and_print_the_same_totals(tmp_path):
    kept = kept_table(2)
    assert ((kept == 0).sum(1) == 1).any()  # some global batch is empty on one rank only
    proc = run_torchrun(Path(__file__).parent / "agreed_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"agreed-{rank}.json").read_text()) == reference(kept, rank)


def test_one_process_trainer_steps_over_a_dropped_batch_without_an_update(train_cache, tmp_path, monkeypatch, capsys):
    """A batch whose every sample was skipped (world 1): a step without an optimizer update, the
    schedule and the batch index moving on, the drop logged and counted."""
    from text4vpr.data.elastic import ElasticBatches
    from text4vpr.train import resolve_config
    from text4vpr.train.logs import read_metrics
    from text4vpr.train.trainer import Trainer

    repo = Path(__file__).resolve().parents[2]
    collate, calls = ElasticBatches._collate, []

    def second_skipped(self, items):  # global batch 1 loses all its samples, as under on_error=skip
        calls.append(len(items))
        return collate(self, [None] * len(items) if len(calls) == 2 else items)

    monkeypatch.setattr(ElasticBatches, "_collate", second_skipped)
    cfg = resolve_config(str(repo / "configs" / "tiny_test.yaml"), [
        f"data.synthetic.cache_dir={train_cache}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
        "eval.final=false", "data.loader.num_workers=0", "data.loader.on_error=skip"])
    trainer = Trainer(cfg)
    weights, after_step = [], trainer.after_step

    def snapshot(*args):
        weights.append(torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()]))
        return after_step(*args)

    monkeypatch.setattr(trainer, "after_step", snapshot)
    trainer.train()
    assert len(weights) == 3 and torch.equal(weights[0], weights[1])  # step 2: no update
    assert not torch.equal(weights[1], weights[2])  # step 3 trained again
    assert trainer.state.step == 3 and trainer.state.batch_in_epoch == 3 and trainer.scheduler.last_epoch == 3
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e["step"] for e in events if e["kind"] == "dropped_batch"] == [2]
    assert f"epoch 0: {calls[1]} samples skipped so far on all ranks" in capsys.readouterr().out
