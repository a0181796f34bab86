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
