"""Torch reference path of group_topk against plain float64 definitions of each mode."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from text4vpr.kernels.common import MODES, decode_keys, encode_keys, merge_topk
from text4vpr.kernels.topk import group_topk

_spec = importlib.util.spec_from_file_location("topk_reference", Path(__file__).with_name("topk_reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("k,chunk", [(1, 7), (5, 64), (37, 50), (128, 1000)])
def test_matches_reference(mode, partial, k, chunk):
    seed = zlib.crc32(f"{mode}-{partial}-{k}".encode())
    q, qm, d, dm = ref.random_case(seed, 13, 211, 4, 24, partial)
    scores, ids = group_topk(q, qm, d, dm, k, mode, backend="torch", chunk_size=chunk)
    want_s, want_i = ref.reference_topk(ref.reference_scores(q, qm, d, dm, mode), k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert scores.shape == (13, min(k, 211))
    np.testing.assert_array_equal(ids.numpy(), want_i)
    np.testing.assert_allclose(scores.numpy(), want_s, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_ties_lower_id_first(mode):
    q, qm, d, dm = ref.random_case(3, 9, 120, 4, 8, partial=True, ties=True)
    for chunk in (16, 33, 500):
        scores, ids = group_topk(q, qm, d, dm, 40, mode, backend="torch", chunk_size=chunk)
        want_s, want_i = ref.reference_topk(ref.reference_scores(q, qm, d, dm, mode), 40)
        np.testing.assert_array_equal(ids.numpy(), want_i)
        np.testing.assert_allclose(scores.numpy(), want_s, rtol=1e-6, atol=1e-6)


def test_keys_roundtrip_and_order():
    s = torch.tensor([0.0, -0.0, 1.5, -1.5, float("inf"), -float("inf"), 3e-38, -3e-38, 2.0, 2.0])
    i = torch.tensor([5, 4, 3, 2, 1, 0, 9, 8, 7, 6])
    ds, di = decode_keys(encode_keys(s, i))
    assert torch.equal(di, i) and torch.equal(ds, s + 0.0)
    order = torch.argsort(encode_keys(s, i), descending=True)
    assert i[order].tolist() == [1, 6, 7, 3, 9, 4, 5, 8, 2, 0]  # 0.0 and -0.0 tie: id 4 before 5


def test_merge_topk_tie_rule():
    s = torch.tensor([[1.0, 2.0, 2.0, 1.0]])
    i = torch.tensor([[0, 9, 3, 1]])
    ms, mi = merge_topk(s, i, 3)
    assert mi.tolist() == [[3, 9, 0]] and ms.tolist() == [[2.0, 2.0, 1.0]]


def test_k_larger_than_database_and_empty():
    q, _, d, _ = ref.random_case(1, 3, 5, 4, 8, False)
    s, i = group_topk(q, None, d, None, 10)
    assert s.shape == (3, 5) and sorted(i[0].tolist()) == list(range(5))
    s, i = group_topk(q, None, d[:0], None, 10)
    assert s.shape == (3, 0)
    s, i = group_topk(q[:0], None, d, None, 2)
    assert s.shape == (0, 2)


def test_bfloat16_inputs_select_on_fp32():
    q, _, d, _ = ref.random_case(2, 6, 90, 4, 16, False)
    qb, db = q.bfloat16(), d.bfloat16()
    s, i = group_topk(qb, None, db, None, 20)
    want_s, want_i = ref.reference_topk(ref.reference_scores(qb.float(), None, db.float(), None, "upstream"), 20)
    np.testing.assert_array_equal(i.numpy(), want_i)


def test_clear_errors():
    q, _, d, _ = ref.random_case(0, 2, 4, 4, 8, False)
    with pytest.raises(ValueError, match="mode"):
        group_topk(q, None, d, None, 1, "dot")
    with pytest.raises(ValueError, match="differ"):
        group_topk(q, None, d[:, :, :4], None, 1)
    with pytest.raises(ValueError, match="k must"):
        group_topk(q, None, d, None, 0)
    with pytest.raises(ValueError, match="query_mask"):
        group_topk(q, torch.ones(2, 3, dtype=torch.bool), d, None, 1)
    bad = q.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        group_topk(bad, None, d, None, 1)
    bad = d.clone()
    bad[3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        group_topk(q, None, bad, None, 1)


def test_merge_keys_of_blocks_is_one_sort_by_the_tie_rule():
    """The one merge (running per-chunk merge, rank gather, Triton splits): the best k of key
    blocks equal a naive sort of all candidates by (score desc, id asc), ties included."""
    from text4vpr.kernels.common import merge_keys

    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 5, (6, 30), generator=g).float()  # many ties
    ids = torch.stack([torch.randperm(1000, generator=g)[:30] for _ in range(6)])
    blocks = [encode_keys(scores[:, a:b], ids[:, a:b]) for a, b in ((0, 7), (7, 8), (8, 30))]
    for k in (1, 5, 30, 50):
        got_s, got_i = decode_keys(merge_keys(blocks, k))
        running = blocks[0]
        for b in blocks[1:]:
            running = merge_keys([running, b], k, sorted=False)
        run_s, run_i = decode_keys(merge_keys([running], k))
        for q in range(6):
            want = sorted(zip((-scores[q]).tolist(), ids[q].tolist()))[:k]
            assert got_i[q].tolist() == [i for _, i in want] == run_i[q].tolist()
            assert got_s[q].tolist() == [-s for s, _ in want] == run_s[q].tolist()
