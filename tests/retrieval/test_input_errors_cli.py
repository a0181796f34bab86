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


def test_a_flipped_bit_in_an_index_parts_coordinates_is_refused(model_dir, synth_shards, index_dir, tmp_path, capsys):
    """The part's coordinates (finite still) are read as they are: only a content checksum sees it."""
    import struct

    from safetensors import safe_open

    bad = tmp_path / "idx"
    shutil.copytree(index_dir, bad)
    part = bad / "part-00000.safetensors"
    data = bytearray(part.read_bytes())
    header_len = struct.unpack("<Q", bytes(data[:8]))[0]
    with safe_open(str(part), framework="pt") as f:
        names = list(f.keys())
    layout = json.loads(bytes(data[8:8 + header_len]))
    start = 8 + header_len + layout["coords"]["data_offsets"][0]
    data[start + 3] ^= 0x01  # a low mantissa bit of the first x: a few nanometres, still finite
    part.write_bytes(bytes(data))
    assert "coords" in names
    line = _err_line(capsys, ["localize", "--model", str(model_dir), "--index", str(bad), "--text", "a red car"])
    assert "part-00000.safetensors" in line and "sha256" in line, line
    line = _err_line(capsys, ["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                              "--index", str(bad), "--out", str(tmp_path / "r")])
    assert "part-00000.safetensors" in line and "sha256" in line, line
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_queries_file_as_the_database_is_refused(model_dir, synth_shards, index_dir, tmp_path, capsys):
    from text4vpr.cli import main as cli

    queries = tmp_path / "q.safetensors"
    assert cli(["index", "queries", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                "--out", str(queries)]) == 0
    capsys.readouterr()
    line = _err_line(capsys, ["eval-embeddings", "--queries", str(queries), "--database", str(queries),
                              "--out", str(tmp_path / "r")])
    assert f"--database {queries}: a query file" in line, line
    part = index_dir / "part-00000.safetensors"
    line = _err_line(capsys, ["eval-embeddings", "--queries", str(part), "--database", str(index_dir),
                              "--out", str(tmp_path / "r")])
    assert f"--queries {part}: an index part" in line, line
    assert not (tmp_path / "r").exists()
