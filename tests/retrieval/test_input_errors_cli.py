"""Damaged or mismatched input fed to the real command line ends in one line naming the
file, exit status 2 — never a traceback (issue 15's acceptance, seen from the CLI)."""

from __future__ import annotations

import json
import shutil

from text4vpr.cli import main


def _err_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_eval_on_a_bit_flipped_shard_is_one_line(model_dir, synth_shards, tmp_path, capsys):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    shard = folder / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for workers in ("0", "1"):  # in-process, and re-raised from a DataLoader worker
        line = _err_line(capsys, ["eval", "--model", str(model_dir), "--shards", str(folder), "--num-workers", workers,
                                  "--out", str(tmp_path / "r")])
        assert "shard-000001.tar" in line and "sha256" in line, line
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_index_of_a_crafted_header_is_one_line(model_dir, synth_shards, index_dir, tmp_path, capsys):
    bad = tmp_path / "idx"
    shutil.copytree(index_dir, bad)
    for header in ([1, 2], {"version": 2}):
        (bad / "header.json").write_text(json.dumps(header))
        line = _err_line(capsys, ["localize", "--model", str(model_dir), "--index", str(bad), "--text", "a red car"])
        assert "header.json" in line, line
