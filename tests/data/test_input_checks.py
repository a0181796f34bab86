"""Issue 25, data side: what a sample's JSON member, an image or a whole build may not be.
`shards inspect` and the loader run one check, so they never disagree."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from text4vpr.data.loader import LoaderConfig, LoaderError, build_loader
from text4vpr.data.shard_reader import ShardError, iter_tar_samples, load_manifest, verify_shards
from text4vpr.data.shards import BuildOptions, build_shards
from tests.helpers import rewrite_first_shard


def _build(root, out, **kw):
    return build_shards(root / "test_description.xlsx", root / "Street360Loc_images", out,
                        BuildOptions(**{"max_count": 3, **kw}), progress=False, log=None)


def _rewrite_first_sample(folder: Path, raw_json: bytes) -> str:
    """Replace the first sample's JSON member with `raw_json` (manifest re-hashed); its key."""
    return rewrite_first_shard(folder, lambda i, suffix, raw: raw_json if (i, suffix) == (0, "json") else raw)[0]


def _first_meta(folder: Path) -> dict:
    return json.loads(next(iter_tar_samples(folder / load_manifest(folder)["shards"][0]["name"]))[1]["json"])


def _loader_error(folder: Path, tokenizer_dir) -> str:
    cfg = LoaderConfig(shards=str(folder), tokenizer=str(tokenizer_dir), batch_size=2, image_size=24, num_workers=0,
                       max_text_length=16)
    with pytest.raises(LoaderError) as e:
        for _ in build_loader(cfg, "eval"):
            pass
    return str(e.value)


CRAFTED = {  # what a crafted (re-hashed) JSON member holds -> what both checks must say
    "NaN coordinates": (lambda m: json.dumps({**m, "xyz": [float("nan"), 1.0, 2.0]}).encode(), "is not finite"),
    "coordinates at the centre of the Earth": (lambda m: json.dumps({**m, "xyz": [0, 0, 0]}).encode(),
                                               "not on its surface"),
    "malformed JSON": (lambda m: json.dumps(m).encode()[:-7], "JSON member unreadable"),
    "positions as text": (lambda m: json.dumps({**m, "positions": [str(p) for p in m["positions"]]}).encode(),
                          "are not distinct view numbers"),
    "fewer descriptions than views": (lambda m: json.dumps({**m, "descriptions": m["descriptions"][:1]}).encode(),
                                      "descriptions are not"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_inspect_and_the_loader_refuse_the_same_sample(synth_shards, tmp_path, tokenizer_dir, name):
    make, says = CRAFTED[name]
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    key = _rewrite_first_sample(folder, make(_first_meta(folder)))
    result = verify_shards(folder)
    assert not result["ok"] and len(result["problems"]) == 1, result["problems"]
    problem = result["problems"][0]
    assert f"sample {key}" in problem and says in problem, problem
    loader = _loader_error(folder, tokenizer_dir)
    assert f"sample {key}" in loader and problem.split(f"sample {key}: ")[1] in loader, (loader, problem)


def test_sound_shards_pass_both(synth_shards):
    assert verify_shards(synth_shards)["ok"]


def _root_with(synth_root, tmp_path, edit_frame=None) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    if edit_frame is not None:
        xlsx = root / "test_description.xlsx"
        frame = pd.read_excel(xlsx)
        edit_frame(frame)
        frame.to_excel(xlsx, index=False)
    return root


def _first_index(root: Path) -> int:
    return int(pd.read_excel(root / "test_description.xlsx")["index"].min())


def test_coordinates_all_zero_are_flagged_at_build_and_refused_on_read(synth_root, tmp_path, tokenizer_dir, capsys):
    root = _root_with(synth_root, tmp_path, lambda f: f.__setitem__(["x", "y", "z"], 0.0))
    out = tmp_path / "s"
    manifest = build_shards(root / "test_description.xlsx", root / "Street360Loc_images", out,
                            BuildOptions(max_count=3), progress=False)
    n = manifest["report"]["counts"]["locations_written"]
    assert manifest["report"]["counts"]["flags"].get("off_earth") == n > 0
    assert f"WARNING: {n} locations have coordinates that are not on the Earth's surface" in capsys.readouterr().out
    assert "not on its surface" in _loader_error(out, tokenizer_dir)


def test_a_16_bit_png_named_jpg_is_dropped_not_made_white(synth_root, tmp_path):
    from PIL import Image

    root = _root_with(synth_root, tmp_path)
    view = root / "Street360Loc_images" / f"{_first_index(root):06d}_2.jpg"
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gray16).save(view, format="PNG")  # 16-bit greyscale
    manifest = _build(root, tmp_path / "s")
    dropped = [d for d in manifest["report"]["dropped_views"] if d["pos"] == 2]
    assert len(dropped) == 1 and "degenerate image: a PNG of mode I;16" in dropped[0]["reason"], dropped


def test_a_flat_view_is_dropped(synth_root, tmp_path):
    from PIL import Image

    root = _root_with(synth_root, tmp_path)
    view = root / "Street360Loc_images" / f"{_first_index(root):06d}_3.jpg"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(view, format="JPEG")
    manifest = _build(root, tmp_path / "s")
    assert [d["reason"] for d in manifest["report"]["dropped_views"]] == ["degenerate image: every pixel has the value 255"]


def test_a_partly_extracted_image_folder_is_refused_before_writing(synth_root, tmp_path):
    root = _root_with(synth_root, tmp_path)
    views = [root / "Street360Loc_images" / f"{i:06d}_{p}.jpg"
             for i in sorted(set(pd.read_excel(root / "test_description.xlsx")["index"])) for p in range(1, 5)]
    for v in views[: int(0.9 * len(views))]:
        v.unlink()
    out = tmp_path / "s"
    with pytest.raises(ShardError, match=r"locations skipped \(\d+%\).*more than --max-skipped-share 0.05 "
                                         r"\(missing image: \d+.*first missing: \d{6}_\d\.jpg"):
        _build(root, out, max_skipped_share=0.05)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    assert _build(root, out, max_skipped_share=1.0)["totals"]["locations"] > 0  # allowed when asked


def test_a_killed_builds_temp_files_are_removed_by_the_next(synth_root, tmp_path):
    out = tmp_path / "s"
    (out / ".parts").mkdir(parents=True)
    orphans = [out / ".tmp-shard-000000.tar.ab12cd", out / ".parts" / ".tmp-shard-000000.tar.json.x1"]
    for p in orphans:
        p.write_bytes(b"half a shard")
    _build(synth_root, out)
    assert not any(p.exists() for p in orphans) and not list(out.rglob(".tmp-*"))


def test_a_shard_duplicated_under_a_rehashed_manifest_is_refused_by_both(synth_shards, tmp_path, tokenizer_dir):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    manifest = load_manifest(folder)
    first, second = manifest["shards"][:2]
    shutil.copy(folder / first["name"], folder / second["name"])
    second.update({k: first[k] for k in ("bytes", "sha256", "count", "views", "keys") if k in first})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = verify_shards(folder)
    assert not result["ok"] and any("duplicate location key" in p for p in result["problems"]), result
    assert "duplicate location key" in _loader_error(folder, tokenizer_dir)


def test_the_loader_refuses_a_16_bit_png_inside_a_shard(synth_shards, tmp_path, tokenizer_dir):
    """A shard of an older build holding a 16-bit PNG as a view: refused, not decoded as white."""
    from PIL import Image

    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    png = io.BytesIO()
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(png, format="PNG")
    key = rewrite_first_shard(folder, lambda i, suffix, raw: png.getvalue() if (i, suffix) == (0, "1.jpg") else raw)[0]
    cfg = LoaderConfig(shards=str(folder), tokenizer=str(tokenizer_dir), batch_size=2, image_size=24, num_workers=0,
                       max_text_length=16)
    with pytest.raises(LoaderError, match=f"sample {key}: .*degenerate image: a PNG of mode I;16"):
        for _ in build_loader(cfg, "eval"):
            pass


def _copy(synth_shards, tmp_path) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(synth_shards, folder)
    return folder


def _not_a_tar_under_its_own_digest(folder: Path) -> str:
    """The first shard replaced by bytes that are no tar, its manifest record rehashed to match."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["shards"][0]
    data = b"not a tar at all " * 100
    (folder / record["name"]).write_bytes(data)
    record.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return record["name"]


def test_hostile_manifests_and_shards_are_one_clear_error(synth_shards, tmp_path, tokenizer_dir):
    """Found from outside: these gave a traceback (JSONDecodeError, KeyError, tarfile.ReadError)."""
    from text4vpr.data.loader import dataset_size
    from text4vpr.data.sample_index import index_offsets

    folder = _copy(synth_shards, tmp_path)
    bad = tmp_path / "bad.json"
    for text in ("{not json", json.dumps({"shards": [{"name": "a.tar"}]})):  # LoaderConfig.manifest, unchecked before
        bad.write_text(text)
        cfg = LoaderConfig(shards=str(folder / "shard-{000000..000001}.tar"), manifest=str(bad),
                           tokenizer=str(tokenizer_dir))
        with pytest.raises(ShardError, match=str(bad)):
            dataset_size(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["totals"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(folder)["ok"]  # no totals to show: still checked
    from text4vpr.cli import main

    assert main(["shards", "inspect", str(folder)]) == 0  # printed from the shard records
    name = _not_a_tar_under_its_own_digest(folder)
    result = verify_shards(folder)
    assert not result["ok"] and any(p.startswith(f"{name}: not a readable tar") for p in result["problems"])
    with pytest.raises(ShardError, match=f"{name}: not a readable tar"):
        index_offsets(folder)
