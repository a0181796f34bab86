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


@pytest.mark.parametrize("flag", ["--nprobe", "--nlist", "--pq-m"])
def test_negative_breadths_are_refused(model_dir, synth_shards, tmp_path, capsys, flag):
    """Found from outside: `--nprobe -1` built an index whose every later search failed."""
    rc = main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(tmp_path / "x"),
               "--approximate", "--kind", "ivf", flag, "-1"])
    assert rc == 2 and f"{flag} must be at least 0, got -1" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_tuned_build_on_two_ranks_ends_and_records_its_tuning(model_dir, synth_shards, tmp_path):
    """Found from outside: with --target-recall only rank 0 encoded the tuning queries, whose
    encoder ends in a collective: the two ranks waited on each other for ever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import HANG_GUARD_S

    args = ["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
            "--batch-size", "4", "--approximate", "--target-recall", "0.99", "--rerank", "2", "--tune-queries", "6"]
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "text4vpr", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}, timeout=HANG_GUARD_S / 12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "header.json").read_text())["approximate"]
    # rank 0 tunes on its own first locations, so the tuning set differs from one process's
    assert two["tuning"]["queries"] > 0 and all(r >= 0.99 for r in two["tuning"]["recall"].values())
    assert sorted(f["part"] for f in two["files"]) == [0, 1]  # each rank built its part's FAISS file
    # one rank's FAISS file damaged: both ranks stop with the one line (each checks only its own files)
    damaged = tmp_path / "two" / "approx-00001.faiss"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "text4vpr", "localize", "--model", str(model_dir), "--index", str(tmp_path / "two"),
                           "--text", "a red door"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}, timeout=HANG_GUARD_S / 12)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 2 and all("approx-00001.faiss" in ln for ln in lines), proc.stderr[-3000:]
