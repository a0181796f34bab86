"""Shard builder: round trip, byte-identical rebuilds, resume after a kill, decode drops, CLI."""

from __future__ import annotations

import json
import os

import pytest

from text4vpr.cli import main as cli
from text4vpr.data.shard_reader import ShardError, find_location, iter_tar_samples, shard_descriptions, verify_shards
from text4vpr.data.shards import BuildOptions, build_shards
from text4vpr.data.street360loc import ReadOptions, read_street360loc


def _build(root, out, split="train", **kw):
    return build_shards(
        root / f"{split}_description.xlsx", root / "Street360Loc_images", out,
        BuildOptions(**{"max_count": 5, **kw}), progress=False, log=None,
    )


def _tar_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_round_trip_is_exact(synth_root, tmp_path):
    manifest = _build(synth_root, tmp_path)
    locs, _ = read_street360loc(synth_root / "train_description.xlsx", synth_root / "Street360Loc_images")
    got = {}
    for s in manifest["shards"]:
        for key, sample in iter_tar_samples(tmp_path / s["name"]):
            meta = json.loads(sample["json"])
            got[meta["index"]] = (key, meta, sample)
    assert len(got) == len(locs) == manifest["totals"]["locations"] == 28
    for loc in locs:
        key, meta, sample = got[loc.index]
        assert key == f"train-{loc.index:06d}"
        assert tuple(meta["xyz"]) == loc.xyz  # float64 exact
        assert meta["positions"] == [v.pos for v in loc.views] == [1, 2, 3, 4]
        assert meta["descriptions"] == [v.description for v in loc.views]
        assert meta["view_mask"] == [True] * 4
        for v in loc.views:
            assert sample[f"{v.pos}.jpg"] == v.image.read_bytes()  # original bytes by default
    assert sorted(shard_descriptions(tmp_path)) == sorted(v.description for loc in locs for v in loc.views)


def test_rebuild_is_byte_identical_with_any_worker_count(synth_root, tmp_path):
    a = _build(synth_root, tmp_path / "a", resize=32)
    b = _build(synth_root, tmp_path / "b", resize=32, workers=2)
    assert _tar_bytes(tmp_path / "a") == _tar_bytes(tmp_path / "b")
    assert a["shards"] == b["shards"] and a["totals"]["shards"] == 6  # 28 locations / 5 per shard


def test_resume_after_a_simulated_kill(synth_root, tmp_path):
    full = _build(synth_root, tmp_path / "full")
    out = tmp_path / "killed"
    _build(synth_root, out)
    # a kill leaves: some finished shards, one renamed tar whose part record was never written,
    # a temp file mid-write, and no manifest
    (out / "manifest.json").unlink()
    (out / ".parts" / "shard-000002.tar.json").unlink()
    for name in ("shard-000003.tar", "shard-000004.tar", "shard-000005.tar"):
        (out / name).unlink()
        (out / ".parts" / f"{name}.json").unlink()
    (out / ".tmp-shard-000003.tar.abc123").write_bytes(b"half a shard")
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}
    lines = []
    resumed = build_shards(
        synth_root / "train_description.xlsx", synth_root / "Street360Loc_images", out,
        BuildOptions(max_count=5), progress=False, log=lines.append,
    )
    assert "(2 reused)" in lines[0]
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # finished shards untouched
    assert resumed["shards"] == full["shards"] and _tar_bytes(out) == _tar_bytes(tmp_path / "full")
    assert verify_shards(out)["ok"]


def test_a_real_kill_midway_then_rerun_completes(synth_root, tmp_path):
    """SIGKILL the builder process as its first shard lands; a rerun completes identically.
    (tests/kill_at_rename.py kills it right after that shard's `.parts` record is renamed
    into place: a deterministic crash point, no polling.)"""
    import glob
    import signal
    import subprocess
    import sys

    out = tmp_path / "k"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo}
    args = ["-m", "text4vpr", "shards", "build", "--xlsx", str(synth_root / "train_description.xlsx"),
            "--images", str(synth_root / "Street360Loc_images"), "--out", str(out), "--max-count", "1",
            "--resize", "512", "--no-progress"]
    killer = [os.path.join(repo, "tests", "kill_at_rename.py"), "after", os.path.join(glob.escape(str(out)), ".parts", "*.json")]
    proc = subprocess.run([sys.executable, *killer, *args], cwd=repo, env=env)
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(out.glob(".parts/*.json")))
    assert 1 <= done_before < 28, "the kill should land midway"
    assert subprocess.run([sys.executable, *args], cwd=repo, env=env).returncode == 0
    assert verify_shards(out)["ok"] and verify_shards(out)["totals"]["locations"] == 28
    ref = _build(synth_root, tmp_path / "ref", max_count=1, resize=512)
    assert json.loads((out / "manifest.json").read_text())["shards"] == ref["shards"]


def test_a_different_build_in_the_same_folder_is_refused(synth_root, tmp_path):
    _build(synth_root, tmp_path)
    with pytest.raises(ShardError, match="different build"):
        _build(synth_root, tmp_path, resize=32)
    _build(synth_root, tmp_path, resize=32, overwrite=True)
    assert verify_shards(tmp_path)["ok"]


def test_undecodable_image_is_dropped_at_build_time_and_counts_add_up(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    img = root / "Street360Loc_images" / "000035_2.jpg"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])  # header fine, data truncated
    for pos in (1, 3, 4):  # a second location loses every view
        p = root / "Street360Loc_images" / f"000036_{pos}.jpg"
        p.write_bytes(p.read_bytes()[:300])
    (root / "Street360Loc_images" / "000036_2.jpg").unlink()
    manifest = _build(root, tmp_path / "out", split="test")
    report = manifest["report"]
    assert report["balanced"] and report["counts"]["rows_in"] == 24
    reasons = sorted((d["index"], d["pos"], d["reason"].split(" (")[0]) for d in report["dropped_views"])
    assert reasons == [(35, 2, "unreadable image"), (36, 1, "unreadable image"), (36, 2, "missing image"),
                       (36, 3, "unreadable image"), (36, 4, "unreadable image")]
    assert [s["index"] for s in report["skipped_locations"]] == [36]
    assert manifest["totals"] == {**manifest["totals"], "locations": 5, "views": 19}
    (_, meta, images), = find_location(tmp_path / "out", 35)
    assert meta["view_mask"] == [True, False, True, True] and sorted(images) == [1, 3, 4]
    with pytest.raises(Exception, match="000035|row"):
        build_shards(root / "test_description.xlsx", root / "Street360Loc_images", tmp_path / "strict",
                     read_options=ReadOptions(strict=True), progress=False, log=None)


def test_max_size_splits_shards(synth_root, tmp_path):
    manifest = _build(synth_root, tmp_path, max_count=100, max_size=40_000)
    assert manifest["totals"]["shards"] > 1
    assert sum(s["count"] for s in manifest["shards"]) == 28


def test_verify_detects_a_changed_shard(synth_root, tmp_path):
    _build(synth_root, tmp_path)
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify_shards(tmp_path)
    assert not result["ok"] and result["problems"] == ["shard-000001.tar: checksum mismatch"]


def test_cli_synth_build_inspect(tmp_path, capsys):
    data, out = tmp_path / "d", tmp_path / "s"
    assert cli(["synth", "--out", str(data), "--locations", "300", "--image-size", "24", "--no-progress"]) == 0
    build = ["shards", "build", "--xlsx", str(data / "test_description.xlsx"), "--images",
             str(data / "Street360Loc_images"), "--no-progress", "--max-count", "16"]
    assert cli(build + ["--out", str(out), "--workers", "2"]) == 0
    assert cli(build + ["--out", str(tmp_path / "again")]) == 0
    assert _tar_bytes(out) == _tar_bytes(tmp_path / "again")
    captured = capsys.readouterr().out
    assert "shards: 45 locations, 180 views in 3 shards" in captured and "rows in 180 = written 180" in captured
    assert json.loads((out / "report.json").read_text())["counts"]["rows_in"] == 180
    assert cli(["shards", "inspect", str(out), "--index", "260", "--write-images", str(tmp_path / "look")]) == 0
    shown = capsys.readouterr().out
    assert "inspect: 3 shards, 45 locations, 180 views" in shown and "all checksums OK" in shown
    assert '"index": 260' in shown and "pos 4: From left to right" in shown
    assert sorted(p.name for p in (tmp_path / "look").iterdir()) == [f"test_000260_{p}.jpg" for p in (1, 2, 3, 4)]


def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members", [
    [("train-000001.json", b"{}"), ("train-000001.1.jpg", b"a"), ("train-000001.1.jpg", b"b")],  # one suffix twice
    [("train-000001.json", b"{}"), ("train-000002.json", b"{}"), ("train-000001.1.jpg", b"a")],  # a split sample
])
def test_duplicate_members_are_an_error_naming_shard_and_key(tmp_path, members):
    path = tmp_path / "s.tar"
    _tar(path, members)
    with pytest.raises(ShardError, match=r"s\.tar: sample train-000001"):
        list(iter_tar_samples(path))
    with open(path, "rb") as f, pytest.raises(ShardError, match=r"shard-x: sample train-000001"):
        list(iter_tar_samples(f, "shard-x"))


def test_the_loader_refuses_a_shard_with_a_duplicate_member(synth_shards, tmp_path, tokenizer_dir):
    from text4vpr.data.loader import LoaderConfig, build_loader
    from text4vpr.data.loader_config import LoaderError

    import shutil
    import tarfile

    out = tmp_path / "dup"
    shutil.copytree(synth_shards, out)
    shard = sorted(out.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members.insert(1, members[0])  # the first sample's first member twice, adjacent
    _tar(shard, members)
    cfg = LoaderConfig(shards=str(out), tokenizer=str(tokenizer_dir), batch_size=2, num_workers=0, verify=False)
    with pytest.raises(LoaderError, match=f"{shard.name}.*{members[0][0].split('.')[0]}"):
        list(build_loader(cfg, "eval"))
