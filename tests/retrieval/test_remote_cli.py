"""The command line with shards at a URL (nginx on loopback): eval, index build and shards
inspect give what they give for the local folder; an unreadable URL is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.cli import main

REPO = Path(__file__).resolve().parents[2]
GUARD_S = 120  # hang guard: without the ranks' agreement, rank 0 would wait in the query gather


def test_eval_and_index_build_from_a_url_equal_the_local_folders(model_dir, synth_shards, index_dir, nginx, tmp_path):
    url = nginx.serve(synth_shards, "cli")
    common = ["--model", str(model_dir), "--num-workers", "0"]
    assert main(["eval", *common, "--shards", url, "--out", str(tmp_path / "u"), "--html"]) == 0
    assert main(["eval", *common, "--shards", str(synth_shards), "--out", str(tmp_path / "l")]) == 0
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("u", "l"))
    assert got["accuracy"] == want["accuracy"] and got["num_queries"] == want["num_queries"] == 6
    assert (tmp_path / "u" / "report.html").read_text().count("data:image/jpeg;base64,") > 0  # thumbnails via the URL

    out = tmp_path / "idx"
    assert main(["index", "build", *common, "--shards", url, "--out", str(out), "--batch-size", "4"]) == 0
    header, ref = (json.loads((d / "header.json").read_text()) for d in (out, index_dir))
    assert header["shards_digest"] == ref["shards_digest"]  # the same manifest bytes
    a, b = load_file(out / "part-00000.safetensors"), load_file(index_dir / "part-00000.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_inspect_checks_every_byte_at_a_url(synth_shards, nginx, tmp_path, capsys):
    assert main(["shards", "inspect", nginx.serve(synth_shards, "inspect-ok"), "--index", "36"]) == 0
    out = capsys.readouterr().out
    assert "all checksums OK" in out and '"index": 36' in out
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    data = bytearray((folder / "shard-000001.tar").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "shard-000001.tar").write_bytes(bytes(data))
    assert main(["shards", "inspect", nginx.serve(folder, "inspect-bad")]) == 1
    assert "shard-000001.tar: checksum mismatch" in capsys.readouterr().out


def test_a_url_without_a_manifest_is_one_line_exit_2(model_dir, nginx, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    url = nginx.serve(tmp_path / "empty", "empty")
    assert main(["eval", "--model", str(model_dir), "--shards", url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {url}/manifest.json: not found on the server (404); check the URL and that the whole "
                   "shard folder was uploaded"]


@pytest.mark.slow
def test_a_shard_failing_on_one_rank_of_a_two_rank_eval_stops_both_with_one_line(model_dir, synth_shards, nginx,
                                                                                  fault_proxy, http_faults, tmp_path):
    """3 shards on 2 ranks: rank 1 alone reads shard-000001, which always answers 503."""
    nginx.serve(synth_shards, "eval2")
    proxy = fault_proxy(http_faults.fail_always("eval2/shard-000001.tar", "503"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "text4vpr",
           "eval", "--model", str(model_dir), "--shards", proxy.url("eval2"), "--num-workers", "0", "--out",
           str(tmp_path / "o")]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=GUARD_S, cwd=tmp_path)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode != 0 and len(errors) == 2, run.stderr[-3000:]
    assert all("eval2/shard-000001.tar: unreadable after 5 tries" in e for e in errors), errors
