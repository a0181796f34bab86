"""`train.data.agreed_batches` under on_error=skip: a global batch of which any rank holds no
sample is dropped on every rank (yielded as None) and its samples counted as skipped; the
totals every rank prints are the same. Checked against a loop over the whole table."""

import json
from pathlib import Path

import pytest

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
