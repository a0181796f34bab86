"""Approximate index (FAISS candidates + exact re-rank) against the exact path on random
inputs, for both kinds (HNSW graph, IVF lists): recall, the (score, then row) order after the
re-rank, tuning, sharding, and the provenance, checksum and tamper refusals."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import faiss  # noqa: E402,F401  (the `approx` extra, part of `test`: a missing faiss fails here, never skips)

from text4vpr.kernels.common import MODES  # noqa: E402
from text4vpr.kernels.topk import group_topk  # noqa: E402
from text4vpr.retrieval.approx_build import build_approximate
from text4vpr.retrieval.approx_index import ApproxConfig, resolve_params  # noqa: E402
from text4vpr.retrieval.approx_load import load_approx_index  # noqa: E402
from text4vpr.retrieval.approx_search import approx_topk  # noqa: E402
from text4vpr.retrieval.approx_tune import HNSW_MAX_EF, recall  # noqa: E402
from text4vpr.retrieval.index import RetrievalIndexError, write_header, write_part  # noqa: E402
from text4vpr.retrieval.provenance import IndexMismatchError  # noqa: E402

V, D = 4, 16
DIGESTS = {"weights_digest": "w" * 64, "shards_digest": "s" * 64}


def _data(n: int, seed: int = 0):
    """Clustered unit views (some missing), and noisy partial-view queries of random rows."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, V, D, generator=g)
    emb = torch.nn.functional.normalize(centres[torch.randint(12, (n,), generator=g)] + 0.5 * torch.randn(n, V, D, generator=g), dim=-1)
    mask = torch.rand(n, V, generator=g) > 0.15
    mask[:, 0] = True
    rows = torch.randint(n, (60,), generator=g)
    q = 5 * (emb[rows] + 0.3 * torch.randn(60, V, D, generator=g))
    q_mask = torch.rand(60, V, generator=g) > 0.3
    q_mask[:, 1] = True
    return emb * mask[..., None], mask, q, q_mask


def _write(path, emb, mask, cuts, locations=None):
    """An exact index of `emb` in parts ending at `cuts` (location indices: the rows, or `locations`)."""
    start, g = 0, torch.Generator().manual_seed(1)
    locations = torch.arange(emb.shape[0]) if locations is None else locations
    for r, end in enumerate(cuts):
        n = end - start
        write_part(path, r, {"embeddings": emb[start:end], "view_mask": mask[start:end],
                             "coords": torch.randn(n, 3, dtype=torch.float64, generator=g), "index": locations[start:end]},
                   "hash", DIGESTS)
        start = end
    write_header(path, "hash", D, V, "float32", [b - a for a, b in zip([0, *cuts[:-1]], cuts)], DIGESTS)


KINDS = ("hnsw", "ivf")
EVERYTHING = 10**6  # a search breadth capped to every list (IVF) / efSearch = the rows (HNSW)


@pytest.fixture(scope="module", params=KINDS)
def built(tmp_path_factory, request):
    """600 locations in two parts, approximate index with a projection (64 -> 32 dims), tuned."""
    path = tmp_path_factory.mktemp(f"approx_{request.param}") / "idx"
    emb, mask, q, q_mask = _data(600)
    _write(path, emb, mask, [350, 600])
    build_approximate(path, ApproxConfig(kind=request.param, coarse_dim=32, rerank=24, hnsw_m=8), tune_queries=q[:30],
                      tune_mask=q_mask[:30], target_recall=0.99)
    return path, emb, mask, q[30:], q_mask[30:]


def _reference_scores(q, qm, emb, mask, mode):
    """float64, one query and one location at a time (the definitions in kernels/common.py)."""
    out = np.zeros((q.shape[0], emb.shape[0]))
    qd, ed = q.double(), emb.double()
    for i in range(q.shape[0]):
        for n in range(emb.shape[0]):
            best = -np.inf
            for r in range(V if mode == "any-heading" else 1):
                s, common = 0.0, 0
                for v in range(V):
                    u = (v + r) % V
                    if qm[i, v] and mask[n, u]:
                        a, b = qd[i, v], ed[n, u]
                        if mode == "cosine":
                            na, nb = a.norm(), b.norm()
                            s += float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
                        else:
                            s += float(a @ b)
                        common += 1
                best = max(best, s / max(common, 1) if mode == "cosine" else s)
            out[i, n] = best
    return out


@pytest.mark.parametrize("mode", MODES)
def test_recall_and_order_match_the_exact_path(built, mode):
    path, emb, mask, q, q_mask = built
    index = load_approx_index(path)
    scores, ids = approx_topk(index, q, q_mask, 10, mode)
    _, exact = group_topk(q, q_mask, emb, mask, 10, mode)
    assert recall(ids, exact) >= 0.97  # tuned to 0.99 on other (held-out) queries
    ref = _reference_scores(q[:8], q_mask[:8], emb, mask, mode)
    for i in range(8):  # returned scores are the exact ones of those rows, in (score desc, row asc) order
        np.testing.assert_allclose(scores[i].double().numpy(), ref[i, ids[i].numpy()], rtol=1e-5, atol=1e-5)
        keys = list(zip(-scores[i].numpy(), ids[i].numpy()))
        assert keys == sorted(keys)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_ties_follow_the_exact_rule(tmp_path, shuffled, kind):
    """Equal scores: the lower location index first (rows when the location indices are the rows)."""
    from text4vpr.retrieval.search import sharded_topk_by_location

    emb, mask, q, q_mask = _data(300, seed=3)
    emb[150:] = emb[:150]  # every location twice: equal scores everywhere
    mask[150:] = mask[:150]
    locations = torch.randperm(300, generator=torch.Generator().manual_seed(4)) * 3 if shuffled else torch.arange(300)
    _write(tmp_path, emb, mask, [170, 300], locations)
    build_approximate(tmp_path, ApproxConfig(kind=kind, nlist=4, nprobe=EVERYTHING, rerank=40))  # a full search
    index = load_approx_index(tmp_path)
    for mode in MODES:
        s, rows = approx_topk(index, q, q_mask, 6, mode)
        es, exact = sharded_topk_by_location(q, q_mask, emb, mask, 6, mode, db_ids=locations, id_offset=0, total=300)
        assert torch.equal(rows, exact), mode  # the exact path's rows and order, duplicates included
        torch.testing.assert_close(s, es, rtol=1e-5, atol=1e-5)


def test_tuning_is_recorded_in_the_header(built):
    path = built[0]
    sec = json.loads((path / "header.json").read_text())["approximate"]
    tuning = sec["tuning"]
    assert tuning["target"] == 0.99 and tuning["k"] == 10 and tuning["queries"] == 60  # 30, and 30 with views dropped
    assert set(tuning["recall"]) == set(MODES) and tuning["reached"] == (min(tuning["recall"].values()) >= 0.99)
    kind = sec["files"][0]["kind"]
    widest = max(f["nlist"] for f in sec["files"]) if kind == "ivf" else min(350, HNSW_MAX_EF)
    assert sec["nprobe"] == tuning["nprobe"] and 1 <= sec["nprobe"] <= widest
    assert sec["nprobe_partial"] == tuning["nprobe_partial"] and 1 <= sec["nprobe_partial"] <= widest
    assert set(tuning["recall_full"]) == set(tuning["recall_partial"]) == set(MODES)
    assert [f["part"] for f in sec["files"]] == [0, 1] and all(f["coarse_dim"] == 32 for f in sec["files"])
    assert sec["kind"] == f"{kind}-sq8" and all(f["kind"] == kind for f in sec["files"])
    if kind == "hnsw":
        assert all((f["hnsw_m"], f["ef_construction"], f["nlist"]) == (8, 128, 0) for f in sec["files"])
        assert sec["config"]["hnsw_m"] == 8


def test_tuning_picks_the_first_breadth_reaching_the_target(built):
    """Queries with every view and partial-view queries each get the first power-of-two breadth
    whose recall of the exact top-10 reaches the target; half of it does not."""
    from text4vpr.retrieval.approx_tune import held_out_queries, tune_nprobe

    path, emb, mask, q, q_mask = built
    index = load_approx_index(path)
    hq, hm = held_out_queries(q[:20], torch.ones(20, V, dtype=torch.bool))
    full = hm.all(1)
    assert full.any() and (~full).any()
    got = tune_nprobe(index, hq, hm, 0.97, modes=("upstream",))
    assert got["reached"] and got["recall"]["upstream"] >= 0.97
    for rows, breadth, name in ((full, got["nprobe"], "full"), (~full, got["nprobe_partial"], "partial")):
        truth = group_topk(hq[rows], hm[rows], emb, mask, 10, "upstream")[1]
        at = recall(approx_topk(index, hq[rows], hm[rows], 10, "upstream", nprobe=breadth)[1], truth)
        assert at >= 0.97 and at == pytest.approx(got[f"recall_{name}"]["upstream"], abs=1e-5), name
        if breadth > 1:
            below = recall(approx_topk(index, hq[rows], hm[rows], 10, "upstream", nprobe=breadth // 2)[1], truth)
            assert below < 0.97, name
    index.nprobe, index.nprobe_partial = got["nprobe"], got["nprobe_partial"]  # each query at its own breadth
    whole = group_topk(hq, hm, emb, mask, 10, "upstream")[1]
    assert recall(approx_topk(index, hq, hm, 10, "upstream")[1], whole) == pytest.approx(got["recall"]["upstream"], abs=1e-5)
    assert not tune_nprobe(index, hq, hm, 1.01, modes=("upstream",))["reached"]  # runs to the widest, says so


def test_the_rule():
    p = resolve_params(ApproxConfig(kind="ivf"), 1_000_000, 8192)
    assert (p["coarse_dim"], p["nlist"], p["pq_m"], p["nbits"], p["nprobe"]) == (256, 4096, 32, 8, 256)
    assert resolve_params(ApproxConfig(kind="ivf"), 100, 64)["nlist"] == 2  # at most n / 39 lists
    p = resolve_params(ApproxConfig(), 1_000_000, 8192)  # the default: a graph, efSearch 2 * rerank before tuning
    assert (p["kind"], p["coarse_dim"], p["nlist"], p["hnsw_m"], p["nprobe"]) == ("hnsw", 256, 0, 32, 64)
    with pytest.raises(ValueError, match="codes"):
        resolve_params(ApproxConfig(codes="pq"), 1000, 64)  # a graph holds sq8 codes only
    with pytest.raises(ValueError, match="divide"):
        resolve_params(ApproxConfig(pq_m=5), 1000, 64)


def test_parts_searched_apart_merge_into_the_whole(built):
    """What two ranks do (each its part, candidates merged) equals one process searching both."""
    from text4vpr.kernels.common import merge_topk

    path, _, _, q, q_mask = built
    whole = approx_topk(load_approx_index(path), q, q_mask, 10, "upstream")
    halves = [approx_topk(load_approx_index(path, parts=[p]), q, q_mask, 10, "upstream") for p in (0, 1)]
    merged = merge_topk(torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1), 10)
    assert torch.equal(merged[1], whole[1]) and torch.equal(merged[0], whole[0])


def test_provenance_refusals(built):
    path = built[0]
    with pytest.raises(RetrievalIndexError, match="another model"):
        load_approx_index(path, config_hash="other")
    with pytest.raises(IndexMismatchError, match="weights digest"):
        load_approx_index(path, weights_digest="x" * 64)
    with pytest.raises(IndexMismatchError, match="shards manifest"):
        load_approx_index(path, shards_digest="y" * 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_approx_index(path, weights_digest="x" * 64, allow_mismatch=True)
    assert any("index mismatch allowed" in str(w.message) for w in caught)


def _copy(path, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(path, out)
    return out


def test_tampered_or_missing_faiss_file_is_refused(built, tmp_path):
    path = _copy(built[0], tmp_path)
    file = path / "approx-00001.faiss"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(RetrievalIndexError, match="checksum"):
        load_approx_index(path)
    header = json.loads((path / "header.json").read_text())  # a header forged to match garbage bytes
    import hashlib

    file.write_bytes(b"not a faiss index at all")
    header["approximate"]["files"][1]["sha256"] = hashlib.sha256(b"not a faiss index at all").hexdigest()
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(RetrievalIndexError, match="unreadable FAISS"):
        load_approx_index(path)
    file.unlink()
    with pytest.raises(RetrievalIndexError, match="missing"):
        load_approx_index(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["files"][0].update(name="../evil.faiss"), "plain file name"),
    (lambda s: s["files"][0].update(count=1), "count or sha256"),
    (lambda s: s["files"].pop(), "no approximate file"),
    (lambda s: s.update(nprobe=0), "nprobe"),
    (lambda s: s.update(nprobe_partial="8"), "nprobe_partial"),
    (lambda s: s["files"][0].update(kind="lsh"), "unknown kind"),
])
def test_crafted_sections_are_refused(built, tmp_path, edit, message):
    path = _copy(built[0], tmp_path)
    header = json.loads((path / "header.json").read_text())
    edit(header["approximate"])
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(RetrievalIndexError, match=message):
        load_approx_index(path)


def test_partial_view_metrics_equal_the_exact_ones(built):
    """The eval path (search_metrics with the approximate searcher) on partial-view queries."""
    from text4vpr.retrieval.approx_search import searcher
    from text4vpr.retrieval.evaluate import search_metrics

    path, emb, mask, q, q_mask = built
    index = load_approx_index(path)
    index.nprobe = index.nprobe_partial = EVERYTHING  # a full search
    index.rerank = 60  # many candidates: the same top-10 as the exact path
    q_coords = index.coords[torch.arange(q.shape[0]) * 7]
    for mode in MODES:
        assert recall(approx_topk(index, q, q_mask, 10, mode)[1], group_topk(q, q_mask, emb, mask, 10, mode)[1]) == 1
        exact = search_metrics(q, q_mask, q_coords, emb, mask, index.coords, (1, 5, 10), (0.3, 1.0), mode).metrics
        approx = search_metrics(q, q_mask, q_coords, torch.zeros(0, V, D), torch.zeros(0, V, dtype=torch.bool),
                                index.coords, (1, 5, 10), (0.3, 1.0), mode, search=searcher(index)).metrics
        for k, row in exact["accuracy"].items():
            for r, value in row.items():
                assert abs(approx["accuracy"][k][r] - value) <= 0.005 + 1e-9, (mode, k, r)


def test_a_file_of_another_kind_is_refused(built, tmp_path):
    """The header's kind must be the FAISS file's: an IVF file declared a graph (or back) is refused."""
    path = _copy(built[0], tmp_path)
    header = json.loads((path / "header.json").read_text())
    for f in header["approximate"]["files"]:
        f["kind"] = "ivf" if f["kind"] == "hnsw" else "hnsw"
        f["nlist"] = f["nlist"] or 4
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(RetrievalIndexError, match="header says"):
        load_approx_index(path)


def test_an_index_built_before_graphs_loads_as_inverted_lists(built, tmp_path):
    """File records without `kind` (written before HNSW existed) are IVF files and still load."""
    path = _copy(built[0], tmp_path)
    header = json.loads((path / "header.json").read_text())
    if header["approximate"]["files"][0]["kind"] != "ivf":
        return
    for f in header["approximate"]["files"]:
        del f["kind"]
    (path / "header.json").write_text(json.dumps(header))
    assert [p.kind for p in load_approx_index(path).parts] == ["ivf", "ivf"]


@pytest.mark.slow
def test_two_rank_build_and_search_equal_one_process(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import HANG_GUARD_S

    root = Path(__file__).resolve().parents[2]
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name("approx_dist_worker.py"))],
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count(": ok") == 8, out[-4000:]
