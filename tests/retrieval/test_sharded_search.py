"""Sharded search: a real 2-rank gloo run equals single-process search exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from text4vpr.kernels.topk import group_topk
from text4vpr.retrieval.search import pad_topk, sharded_group_topk
from tests.helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_is_group_topk():
    g = torch.Generator().manual_seed(0)
    q, db = torch.randn(5, 4, 8, generator=g), torch.randn(30, 4, 8, generator=g)
    s, i = sharded_group_topk(q, None, db, None, 40, id_offset=0, total=30)
    s_ref, i_ref = group_topk(q, None, db, None, 40)
    assert torch.equal(i, i_ref) and torch.equal(s, s_ref) and s.shape == (5, 30)


def test_pad_topk_sorts_last():
    s, i = pad_topk(torch.tensor([[1.0]]), torch.tensor([[3]]), 3)
    assert s[0, 1:].isneginf().all() and i.shape == (1, 3)


@pytest.mark.slow
def test_two_rank_gloo_equals_single_process(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + ["--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name("sharded_search_worker.py"))],
        env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count(": ok") == 12, out[-4000:]


def _naive_by_location(q, db, loc, k):
    """Per query: database rows by (score desc, location index asc), float64 scores (exact here)."""
    scores = torch.einsum("qvd,nvd->qn", q.double(), db.double())
    return [sorted(range(len(loc)), key=lambda r: (-float(scores[i, r]), int(loc[r])))[:k] for i in range(len(q))]


def test_ties_rank_by_location_index_not_row():
    """Exact ties, location ids in shuffled row order: search_metrics ranks equal scores by the
    lower location index (not the lower row), for a whole database and for two slices merged as
    the ranks' gathered lists are."""
    from text4vpr.kernels.common import encode_keys
    from text4vpr.retrieval.evaluate import search_metrics
    from text4vpr.retrieval.search import merge_gathered, slice_in_location_order

    g = torch.Generator().manual_seed(7)
    q = torch.randint(-1, 2, (6, 4, 8), generator=g).float()
    db = torch.randint(-1, 2, (40, 4, 8), generator=g).float()
    db[20:] = db[:20]  # every location has an exact twin
    loc = torch.randperm(1000, generator=g)[:40]
    coords = torch.rand(40, 3, generator=g, dtype=torch.float64) * 100
    want = _naive_by_location(q, db, loc, 10)
    got = search_metrics(q, None, coords[:6], db, None, coords, ks=(1, 10), radii=(5.0,),
                         ids=(loc[:6], loc)).ranking.ids
    assert got.tolist() == want
    blocks = []
    for lo, hi in ((0, 17), (17, 40)):  # two ranks' slices, each searched in location order
        part, _, key_ids = slice_in_location_order(db[lo:hi], None, loc, lo)
        s, i = sharded_group_topk(q, None, part, None, 10, id_offset=lo, total=40, key_ids=key_ids)
        blocks.append(encode_keys(*pad_topk(s, i, 10)))
    _, merged = merge_gathered(blocks, 10, 40)
    rows = {int(v): r for r, v in enumerate(loc)}
    assert [[rows[int(v)] for v in row] for row in merged] == want


def test_localize_ranks_ties_by_location_index():
    """rank_locations on an index whose rows are not in location order: equal scores list the
    lower location index first (a naive sort), rows and coordinates those of that location."""
    from types import SimpleNamespace

    from text4vpr.retrieval.localize import rank_locations

    g = torch.Generator().manual_seed(3)
    db = torch.randint(-1, 2, (30, 4, 8), generator=g).float()
    db[15:] = db[:15]  # exact twins
    loc = torch.randperm(500, generator=g)[:30]
    index = SimpleNamespace(embeddings=db, view_mask=torch.ones(30, 4, dtype=torch.bool), index=loc, rows=(0, 30),
                            coords=torch.rand(30, 3, generator=g, dtype=torch.float64) * 1e6 + 4e6)
    q = db[4:5].clone()
    got = rank_locations(q, torch.ones(1, 4, dtype=torch.bool), index, top_k=6)
    want = _naive_by_location(q, db, loc, 6)[0]
    assert [r["row"] for r in got] == want and [r["index"] for r in got] == [int(loc[r]) for r in want]
