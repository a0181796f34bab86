"""`index build --approximate` end to end on the synthetic split with a tiny model: the
header records the tuning, and `eval --index` / `localize` give the exact index's answers."""

from __future__ import annotations

import json

import pytest

import faiss  # noqa: E402,F401  (the `approx` extra, part of `test`: a missing faiss fails here, never skips)

from text4vpr.cli import main  # noqa: E402
from text4vpr.kernels.common import MODES  # noqa: E402


@pytest.fixture(scope="module", params=["hnsw", "ivf"])
def approx_dir(model_dir, synth_shards, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"approx_cli_{request.param}") / "idx"
    rc = main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(out),
               "--num-workers", "0", "--batch-size", "4", "--approximate", "--target-recall", "0.99", "--kind", request.param,
               "--rerank", "2", "--tune-queries", "6"])  # 6 locations: 2 candidates each keeps FAISS in the path
    assert rc == 0
    return out


def test_header_records_parameters_and_recall(approx_dir, capsys):
    sec = json.loads((approx_dir / "header.json").read_text())["approximate"]
    assert sec["rerank"] == 2 and sec["tuning"]["queries"] == 12 and set(sec["tuning"]["recall"]) == set(MODES)
    assert sec["files"][0]["name"] == "approx-00000.faiss" and (approx_dir / "approx-00000.faiss").is_file()
    assert sec["kind"] == f"{sec['files'][0]['kind']}-sq8" and sec["config"]["kind"] == sec["files"][0]["kind"]
    assert sec["nprobe_partial"] == sec["tuning"]["nprobe_partial"] >= 1


@pytest.mark.parametrize("mode", MODES)
def test_eval_with_the_approximate_index_matches_the_exact_one(approx_dir, model_dir, synth_shards, tmp_path, mode):
    tables = {}
    for flag in ([], ["--exact"]):
        out = tmp_path / ("exact" if flag else "approx")
        rc = main(["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--index", str(approx_dir),
                   "--out", str(out), "--num-workers", "0", "--batch-size", "4", "--mode", mode, *flag])
        assert rc == 0
        tables[bool(flag)] = json.loads((out / "metrics.json").read_text())["accuracy"]
    for k, row in tables[True].items():
        for r, value in row.items():
            assert abs(tables[False][k][r] - value) <= 0.005, (k, r)


def test_localize_with_the_approximate_index(approx_dir, model_dir, capsys):
    answers = []
    for flag in ([], ["--exact"]):
        rc = main(["localize", "--model", str(model_dir), "--index", str(approx_dir), "--text", "a red car",
                   "--text", "a tree", "--top-k", "3", "--json", *flag])
        assert rc == 0
        answers.append([(r["row"], round(r["score"], 4)) for r in json.loads(capsys.readouterr().out)["results"]])
    assert answers[0] == answers[1]


def test_bad_flags_are_refused_before_encoding(model_dir, synth_shards, tmp_path, capsys):
    rc = main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(tmp_path / "x"),
               "--approximate", "--target-recall", "1.5"])
    assert rc == 2 and "--target-recall" in capsys.readouterr().err and not (tmp_path / "x").exists()
    rc = main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(tmp_path / "x"),
               "--approximate", "--codes", "pq"])  # a graph holds sq8 codes only
    assert rc == 2 and "--kind ivf" in capsys.readouterr().err and not (tmp_path / "x").exists()
