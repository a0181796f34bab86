"""Issue 15, data side: each finding reproduced on synthetic data, then refused or reported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from text4vpr.cli import main as cli
from text4vpr.data.loader import LoaderConfig, LoaderError, build_loader
from text4vpr.data.shard_reader import ShardError, iter_tar_samples, load_manifest, verify_shards
from text4vpr.data.shards import BuildOptions, build_lock, build_shards
from text4vpr.data.street360loc import ReadOptions, read_street360loc
from tests.helpers import HANG_GUARD_S, rewrite_first_shard

REPO = Path(__file__).resolve().parents[2]


def _build(root, out, split="train", read=ReadOptions(), **kw):
    return build_shards(root / f"{split}_description.xlsx", root / "Street360Loc_images", out,
                        BuildOptions(**{"max_count": 5, **kw}), read, progress=False, log=None)


def _copy_root(synth_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def _indices(xlsx: Path) -> list[int]:
    return sorted(set(pd.read_excel(xlsx)["index"].astype(int)))


def _shard_indices(out: Path) -> list[tuple[str, int]]:
    return sorted((json.loads(s["json"])["split"], json.loads(s["json"])["index"])
                  for e in load_manifest(out)["shards"] for _, s in iter_tar_samples(out / e["name"]))


# ---- 1: the validation split ---------------------------------------------------------------
def _readme_val_command(repo_readme: Path) -> list[str]:
    """The README's val-shards command, joined over its continuation line."""
    lines = repo_readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "--out shards/val" in line or ("shards build" in line and "val_description" in line))
    text = lines[start].split("#")[0].strip()
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + " " + lines[start].split("#")[0].strip()
    return text.split()


@pytest.fixture
def overlapping_root(synth_root, tmp_path):
    """Synthetic data whose val file also holds two train locations (as the real val shares 4000, 5000)."""
    root = _copy_root(synth_root, tmp_path)
    train = pd.read_excel(root / "train_description.xlsx")
    val = pd.read_excel(root / "val_description.xlsx")
    shared = train[train["index"].isin(_indices(root / "train_description.xlsx")[3:5])]
    pd.concat([val, shared]).to_excel(root / "val_description.xlsx", index=False)
    return root


@pytest.mark.parametrize("source", ["readme", "docs/data.md"])
def test_val_command_as_written_builds_only_val_minus_train(overlapping_root, tmp_path, source):
    words = _readme_val_command(REPO / ("README.md" if source == "readme" else source))
    assert words[:3] == ["text4vpr", "shards", "build"]
    args = [w.replace("DATA/", f"{overlapping_root}/").replace("shards/val", str(tmp_path / "val")) for w in words[1:]]
    assert cli(args + ["--no-progress", "--workers", "1"]) == 0
    train = set(_indices(overlapping_root / "train_description.xlsx"))
    val = set(_indices(overlapping_root / "val_description.xlsx"))
    assert len(val & train) == 2
    assert _shard_indices(tmp_path / "val") == [("val", i) for i in sorted(val - train)]


def test_drop_overlap_with_two_files_writes_the_last_minus_the_first(overlapping_root, tmp_path):
    r = overlapping_root
    assert cli(["shards", "build", "--xlsx", str(r / "train_description.xlsx"), str(r / "val_description.xlsx"),
                "--drop-overlap", "--images", str(r / "Street360Loc_images"), "--out", str(tmp_path / "v"),
                "--no-progress"]) == 0
    train, val = set(_indices(r / "train_description.xlsx")), set(_indices(r / "val_description.xlsx"))
    assert _shard_indices(tmp_path / "v") == [("val", i) for i in sorted(val - train)]
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["balanced"] and report["counts"]["locations_in"] == len(val)
    assert sorted(s["index"] for s in report["skipped_locations"]) == sorted(val & train)


# ---- 3: inspect --write-images -------------------------------------------------------------
def _rewrite_shard(folder: Path, edit) -> None:
    """Rewrite the first shard's JSON members with `edit(meta)`, fixing the manifest (a crafted folder)."""
    rewrite_first_shard(folder, lambda i, suffix, raw: (json.dumps(edit(json.loads(raw))).encode()
                                                        if suffix == "json" else raw))


@pytest.mark.parametrize("split", ["../../escaped", "ABS/escaped", "a/b"])
def test_inspect_write_images_stays_in_its_folder(synth_shards, tmp_path, split):
    split = split.replace("ABS", str(tmp_path / "abs"))  # an absolute path, inside tmp_path so an escape is seen
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    index = json.loads(next(iter_tar_samples(folder / load_manifest(folder)["shards"][0]["name"]))[1]["json"])["index"]
    _rewrite_shard(folder, lambda m: {**m, "split": split})
    look = tmp_path / "deep" / "look"
    cli(["shards", "inspect", str(folder), "--index", str(index), "--write-images", str(look)])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jpg"))
    assert len(written) == 4 and all(p.parent == look.relative_to(tmp_path) for p in written), written


# ---- 4, 9: --overwrite, the lock, workers that die with the builder -----------------------
def test_overwrite_removes_only_files_of_the_previous_build(synth_root, tmp_path):
    _build(synth_root, tmp_path)
    (tmp_path / "mine.tar").write_bytes(b"not a shard of this build")
    (tmp_path / "shard-000999.tar").write_bytes(b"nor this")
    _build(synth_root, tmp_path, resize=32, overwrite=True)
    assert (tmp_path / "mine.tar").read_bytes() == b"not a shard of this build"
    assert (tmp_path / "shard-000999.tar").exists()
    assert verify_shards(tmp_path)["ok"]


def test_a_second_builder_on_a_locked_folder_fails_clearly(synth_root, tmp_path):
    from text4vpr.data.shard_reader import ShardError

    with build_lock(tmp_path):
        with pytest.raises(ShardError, match=f"{tmp_path}.*another build"):
            _build(synth_root, tmp_path)
    _build(synth_root, tmp_path)  # released
    assert verify_shards(tmp_path)["ok"]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_builder_workers_die_with_a_killed_builder(synth_root, tmp_path):
    out = tmp_path / "k"
    args = [sys.executable, "-m", "text4vpr", "shards", "build", "--xlsx", str(synth_root / "train_description.xlsx"),
            "--images", str(synth_root / "Street360Loc_images"), "--out", str(out), "--max-count", "1",
            "--resize", "512", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + HANG_GUARD_S  # a guard against a hang, not a measurement
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".parts/*.json")):
        time.sleep(0.01)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers, "the builder should have started its pool"
    deadline = time.monotonic() + 300  # a guard: SIGKILL from the parent's death is immediate
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)


# ---- 5: verified shards ---------------------------------------------------------------------
def _cfg(shards, tokenizer_dir, **kw):
    return LoaderConfig(**{**dict(shards=str(shards), tokenizer=str(tokenizer_dir), batch_size=2, image_size=24,
                                  num_workers=0, max_text_length=16), **kw})


def test_a_shard_copied_over_another_is_refused(synth_shards, tmp_path, tokenizer_dir):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    shutil.copy(folder / "shard-000000.tar", folder / "shard-000001.tar")
    with pytest.raises(LoaderError, match="shard-000001.tar.*sha256"):
        list(build_loader(_cfg(folder, tokenizer_dir), "eval"))
    got = [i for b in build_loader(_cfg(folder, tokenizer_dir, verify=False), "eval") for i in b["index"].tolist()]
    assert len(got) != len(set(got))  # the trusted hot path reads what is there


def test_flipped_bytes_inside_a_jpeg_are_detected(synth_shards, tmp_path, tokenizer_dir):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    shard = folder / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"\xff\xda") + 200  # inside the first JPEG's scan data
    data[at] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match="shard-000002.tar.*sha256"):
        list(build_loader(_cfg(folder, tokenizer_dir), "eval"))
    loader = build_loader(_cfg(folder, tokenizer_dir, on_error="skip"), "eval")
    seen = [i for b in loader for i in b["index"].tolist()]
    assert len(seen) == 4 and loader.dataset.stats.samples_skipped == 2


def test_a_shard_of_another_build_with_a_crafted_manifest_is_refused(synth_root, tmp_path, tokenizer_dir):
    a = _build(synth_root, tmp_path / "a", split="test", max_count=2, resize=32)
    _build(synth_root, tmp_path / "b", split="test", max_count=2, resize=48)
    shutil.copy(tmp_path / "b" / "shard-000001.tar", tmp_path / "a" / "shard-000001.tar")
    a["shards"][1] = load_manifest(tmp_path / "b")["shards"][1]  # the checksum matches: only the contents tell
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(a))
    with pytest.raises(LoaderError, match=r"shard-000001.tar.*48x48.*--resize 32"):
        list(build_loader(_cfg(tmp_path / "a", tokenizer_dir), "eval"))


def test_duplicated_location_keys_in_a_manifest_are_refused(synth_shards, tmp_path, tokenizer_dir):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    m = load_manifest(folder)
    m["shards"][1] = {**m["shards"][0], "name": "shard-000001.tar"}  # checksum and keys of shard 0
    shutil.copy(folder / "shard-000000.tar", folder / "shard-000001.tar")
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LoaderError, match="shard-000001.tar.*duplicate"):
        list(build_loader(_cfg(folder, tokenizer_dir), "eval"))


def test_resume_rewrites_a_corrupt_shard_of_the_same_size(synth_root, tmp_path):
    ref = _build(synth_root, tmp_path)
    shard = tmp_path / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "manifest.json").unlink()
    again = _build(synth_root, tmp_path)
    assert again["shards"] == ref["shards"] and verify_shards(tmp_path)["ok"]


# ---- 8: images ------------------------------------------------------------------------------
def _huge_jpeg_header(path: Path, side: int = 20000) -> None:
    """A small JPEG whose header claims side x side pixels (what a decompression bomb looks like)."""
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


def test_a_huge_image_is_dropped_and_reported_not_a_crash(synth_root, tmp_path):
    import warnings

    root = _copy_root(synth_root, tmp_path)
    _huge_jpeg_header(root / "Street360Loc_images" / "000035_2.jpg")
    _huge_jpeg_header(root / "Street360Loc_images" / "000036_3.jpg", side=12000)  # PIL warns here, errors above
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest = _build(root, tmp_path / "out", split="test")
    drops = sorted((d["index"], d["pos"]) for d in manifest["report"]["dropped_views"])
    assert drops == [(35, 2), (36, 3)]
    assert all("pixels" in d["reason"] for d in manifest["report"]["dropped_views"])
    assert manifest["report"]["balanced"] and manifest["totals"]["views"] == 22


def test_pixel_limit_is_configurable(synth_root, tmp_path):
    locs, report = read_street360loc(synth_root / "test_description.xlsx", synth_root / "Street360Loc_images",
                                     ReadOptions(max_pixels=64 * 64 - 1))
    assert locs == [] and len(report.dropped_views) == 24


def test_symlink_out_of_the_image_folder_is_refused(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(root / "Street360Loc_images" / "000035_1.jpg", outside)
    link = root / "Street360Loc_images" / "000035_1.jpg"
    link.unlink()
    link.symlink_to(outside)
    inside = root / "Street360Loc_images" / "000036_1.jpg"
    inside.rename(root / "Street360Loc_images" / "other.jpg")
    inside.symlink_to("other.jpg")  # a link that stays inside is fine
    manifest = _build(root, tmp_path / "out", split="test")
    (d,) = manifest["report"]["dropped_views"]
    assert (d["index"], d["pos"]) == (35, 1) and "outside" in d["reason"]


def test_the_loader_refuses_an_image_over_its_pixel_limit(synth_shards, tokenizer_dir):
    loader = build_loader(_cfg(synth_shards, tokenizer_dir, max_pixels=64 * 64 - 1, on_error="skip"), "eval")
    assert sum(b["index"].numel() for b in loader) == 0 and loader.dataset.stats.samples_skipped == 6
    with pytest.raises(LoaderError, match="pixels"):
        list(build_loader(_cfg(synth_shards, tokenizer_dir, max_pixels=64 * 64 - 1), "eval"))


# ---- 10: OS errors while building -----------------------------------------------------------
def test_an_os_error_while_writing_is_one_line_naming_the_path(synth_root, tmp_path, capsys, monkeypatch):
    import errno

    from text4vpr.data import shard_pack

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_pack, "_add_member", full)
    out = tmp_path / "o"
    rc = cli(["shards", "build", "--xlsx", str(synth_root / "test_description.xlsx"), "--images",
              str(synth_root / "Street360Loc_images"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(out / "shard-000000.tar") in err[0] and "No space left on device" in err[0]
    assert "Traceback" not in err[0]


def test_os_error_from_a_pool_worker_keeps_its_path():
    import pickle

    from text4vpr.data.shard_pack import ShardWriteError

    e = pickle.loads(pickle.dumps(ShardWriteError("/out/shard-000003.tar", "No space left on device")))
    assert isinstance(e, ShardWriteError) and e.path == "/out/shard-000003.tar"
    assert str(e) == "/out/shard-000003.tar: cannot write: No space left on device"


def test_a_shard_list_without_a_manifest_is_read_only_unverified(synth_shards, tokenizer_dir):
    pattern = str(synth_shards / "shard-{000000..000002}.tar")
    with pytest.raises(LoaderError, match="without a manifest"):
        build_loader(_cfg(pattern, tokenizer_dir), "eval")
    got = sorted(i for b in build_loader(_cfg(pattern, tokenizer_dir, verify=False), "eval") for i in b["index"].tolist())
    ref = sorted(i for b in build_loader(_cfg(synth_shards, tokenizer_dir), "eval") for i in b["index"].tolist())
    assert got == ref == list(range(35, 41))
    with_manifest = _cfg(pattern, tokenizer_dir, manifest=str(synth_shards / "manifest.json"))
    assert sorted(i for b in build_loader(with_manifest, "eval") for i in b["index"].tolist()) == ref


def test_manifest_keys_that_are_not_the_shards_are_refused(synth_shards, tmp_path, tokenizer_dir):
    """The manifest's key lists (used e.g. by the trainer's split-overlap check) must be the
    shards' own: a crafted list with the right checksum is refused when the shard is read."""
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    m = load_manifest(folder)
    m["shards"][0]["keys"] = [k.replace("test-", "train-") for k in m["shards"][0]["keys"]]
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LoaderError, match="shard-000000.tar.*keys differ"):
        list(build_loader(_cfg(folder, tokenizer_dir), "eval"))


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "a/b.tar"])
def test_manifest_shard_names_are_plain_file_names(synth_shards, tmp_path, tokenizer_dir, name):
    """A shard name from the manifest never becomes a path outside the folder (read side)."""
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    m = load_manifest(folder)
    m["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="not a plain file name"):
        list(build_loader(_cfg(folder, tokenizer_dir, verify=False), "eval"))
    with pytest.raises(ShardError, match="not a plain file name"):
        verify_shards(folder)
