"""Street360Loc reader: one case per validation rule, counts add up, the real val/train files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from text4vpr.data.street360loc import ReadOptions, Street360LocError, read_street360loc

REAL = str(Path(__file__).resolve().parents[2].parent / "shared" / "street360loc")  # ../shared beside the clone
TEXT = "From left to right, the main features include: 1. a red car 2. a green tree 3. a blue sign."


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


# ECEF metres of a point in Paris (coordinates off the Earth's surface are flagged)
def _rows(index, xyz=(4200000.0, 170000.0, 4780000.0), positions=(1, 2, 3, 4), text=TEXT):
    return [{"index": index, "pos": p, "x": xyz[0], "y": xyz[1], "z": xyz[2], "text_description": text} for p in positions]


def _write(tmp_path, rows, name="train_description.xlsx", images=True):
    """Write an xlsx and (optionally) a valid image for every (index, pos) row."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images:
        for r in rows:
            if isinstance(r["pos"], int):
                (img_dir / f"{r['index']:06d}_{r['pos']}.jpg").write_bytes(_jpeg())
    pd.DataFrame(rows).to_excel(tmp_path / name, index=False)
    return tmp_path / name, img_dir


def _read(path, img_dir, **kw):
    locs, rep = read_street360loc(path, img_dir, ReadOptions(**kw))
    assert rep.rows_in == rep.rows_written + rep.rows_listed()  # counts always add up
    assert rep.rows_written == sum(len(loc.views) for loc in locs)
    return locs, rep


def test_clean_file_reads_everything(tmp_path):
    path, imgs = _write(tmp_path, _rows(1) + _rows(2, xyz=(4200010.0, 170000.0, 4780000.0)))
    locs, rep = _read(path, imgs)
    assert [loc.index for loc in locs] == [1, 2]
    assert locs[1].xyz == (4200010.0, 170000.0, 4780000.0) and [v.pos for v in locs[1].views] == [1, 2, 3, 4]
    assert locs[0].split == "train" and rep.counts()["rows_in"] == 8 and not rep.flags


@pytest.mark.parametrize(
    "problem",
    ["missing_column", "unreadable_file", "wrong_type_index", "wrong_type_pos", "wrong_type_coord"],
)
def test_file_level_problems_raise_naming_the_file(tmp_path, problem):
    rows = _rows(1)
    if problem == "missing_column":
        rows = [{k: v for k, v in r.items() if k != "z"} for r in rows]
    elif problem == "wrong_type_index":
        rows[2]["index"] = "abc"
    elif problem == "wrong_type_pos":
        rows[1]["pos"] = 2.5
    elif problem == "wrong_type_coord":
        rows[3]["x"] = "far away"
    path, imgs = _write(tmp_path, rows, images=False)
    if problem == "unreadable_file":
        path.write_bytes(b"this is not a spreadsheet")
    with pytest.raises(Street360LocError) as err:
        read_street360loc(path, imgs)
    assert str(path) in str(err.value)
    if problem.startswith("wrong_type"):
        assert "row" in str(err.value)


@pytest.mark.parametrize(
    "rule,reason",
    [
        ("empty_description", "empty description"),
        ("nan_description", "empty description"),
        ("missing_image", "missing image"),
        ("unreadable_image", "unreadable image"),
        ("pos_outside", "pos 5 outside"),
        ("duplicate_pos", "duplicate pos 2"),
    ],
)
def test_bad_view_is_dropped_and_reported(tmp_path, rule, reason):
    rows = _rows(7)
    if rule == "empty_description":
        rows[1]["text_description"] = "   "
    elif rule == "nan_description":
        rows[1]["text_description"] = float("nan")
    elif rule == "pos_outside":
        rows[1]["pos"] = 5
    elif rule == "duplicate_pos":
        rows.append(dict(rows[1]))
    path, imgs = _write(tmp_path, rows)
    if rule == "missing_image":
        (imgs / "000007_2.jpg").unlink()
    elif rule == "unreadable_image":
        (imgs / "000007_2.jpg").write_bytes(b"not a jpeg")
    locs, rep = _read(path, imgs)
    assert len(rep.dropped_views) == 1
    drop = rep.dropped_views[0]
    assert drop["reason"].startswith(reason) and drop["index"] == 7 and drop["file"] == path.name
    assert drop["row"] == (6 if rule == "duplicate_pos" else 3)  # spreadsheet row numbers
    (loc,) = locs
    expected = [True, True, True, True] if rule == "duplicate_pos" else [True, False, True, True]
    assert loc.view_mask == expected  # fewer than four views: kept, with a mask


@pytest.mark.parametrize("rule", ["coords_differ", "coords_nan", "coords_inf"])
def test_bad_location_is_skipped_and_reported(tmp_path, rule):
    rows = _rows(3) + _rows(4)
    if rule == "coords_differ":
        rows[2]["x"] += 0.02  # 2 cm > 1 cm
    elif rule == "coords_nan":
        rows[0]["z"] = float("nan")
    else:
        rows[0]["y"] = math.inf
    path, imgs = _write(tmp_path, rows)
    locs, rep = _read(path, imgs)
    assert [loc.index for loc in locs] == [4]
    (skip,) = rep.skipped_locations
    assert skip["index"] == 3 and skip["rows"] == [2, 3, 4, 5]
    assert ("differ" if rule == "coords_differ" else "non-finite") in skip["reason"]


def test_coordinates_within_one_centimetre_are_fine(tmp_path):
    rows = _rows(3)
    rows[2]["x"] += 0.009
    path, imgs = _write(tmp_path, rows)
    locs, rep = _read(path, imgs)
    assert len(locs) == 1 and not rep.skipped_locations


def test_min_views_skips_partial_locations(tmp_path):
    path, imgs = _write(tmp_path, _rows(1, positions=(1, 3)) + _rows(2))
    locs, _ = _read(path, imgs)
    assert locs[0].view_mask == [True, False, True, False]
    locs, rep = _read(path, imgs, min_views=4)
    assert [loc.index for loc in locs] == [2]
    assert rep.skipped_locations[0]["index"] == 1 and "min-views" in rep.skipped_locations[0]["reason"]


def test_refusal_and_short_descriptions_are_kept_and_flagged(tmp_path):
    rows = _rows(1)
    rows[0]["text_description"] = "I'm sorry, I can't assist with that."
    rows[1]["text_description"] = "A red car."
    path, imgs = _write(tmp_path, rows)
    locs, rep = _read(path, imgs)
    assert len(locs[0].views) == 4
    assert sorted((f["flag"], f["pos"]) for f in rep.flags) == [("refusal", 1), ("short", 2)]
    _, rep = _read(path, imgs, refusal_patterns=(r"assist with that",), short_chars=5)
    assert [f["flag"] for f in rep.flags] == ["refusal"]


def test_overlap_is_flagged_and_drop_overlap_removes_it_from_the_later_file(tmp_path):
    a, imgs = _write(tmp_path, _rows(1) + _rows(2), name="train_description.xlsx")
    b, _ = _write(tmp_path, _rows(2) + _rows(3), name="val_description.xlsx")
    locs, rep = _read([a, b], imgs)
    assert [(loc.split, loc.index) for loc in locs] == [("train", 1), ("train", 2), ("val", 2), ("val", 3)]
    assert [(f["file"], f["index"]) for f in rep.flags if f["flag"] == "overlap"] == [(b.name, 2)]
    locs, rep = _read([a, b], imgs, drop_overlap=True)
    assert [(loc.split, loc.index) for loc in locs] == [("train", 1), ("train", 2), ("val", 3)]
    assert rep.skipped_locations[0]["file"] == b.name and "overlap" in rep.skipped_locations[0]["reason"]


def test_strict_turns_a_skip_into_an_error(tmp_path):
    rows = _rows(9)
    rows[3]["text_description"] = ""
    path, imgs = _write(tmp_path, rows)
    with pytest.raises(Street360LocError, match=r"train_description.xlsx: row\(s\) \[5\]: index 9: empty description"):
        read_street360loc(path, imgs, ReadOptions(strict=True))


def _need_real() -> None:
    if not Path(REAL).is_dir():  # CI lays ../shared beside the clone; elsewhere these tests cannot run
        pytest.skip(f"needs the real Street360Loc annotations in {REAL}")


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    """Stand-in images (one tiny JPEG, copied) for every view of the real val file."""
    _need_real()
    out = tmp_path_factory.mktemp("real_images")
    frame = pd.read_excel(f"{REAL}/val_description.xlsx")
    data = _jpeg()
    for index, pos in zip(frame["index"], frame["pos"]):
        (out / f"{int(index):06d}_{int(pos)}.jpg").write_bytes(data)
    return out


def test_real_val_file_with_stand_in_images(real_images):
    locs, rep = _read(f"{REAL}/val_description.xlsx", real_images)
    assert len(locs) == 1001 and sum(len(loc.views) for loc in locs) == 4004
    assert (min(loc.index for loc in locs), max(loc.index for loc in locs)) == (4000, 5000)
    frame = pd.read_excel(f"{REAL}/val_description.xlsx")
    refusals = frame["text_description"].str.contains(r"I'm sorry|I'm unable", regex=True).sum()
    assert rep.counts()["flags"].get("refusal", 0) == refusals  # the val copy holds none; train holds some


def test_real_train_and_val_report_shared_indices_and_refusals():
    _need_real()
    locs, rep = _read([f"{REAL}/train_description.xlsx", f"{REAL}/val_description.xlsx"], None)
    assert len(locs) == 5001 + 1001
    assert sorted(f["index"] for f in rep.flags if f["flag"] == "overlap") == [4000, 5000]
    refusals = [f for f in rep.flags if f["flag"] == "refusal"]
    assert len(refusals) >= 12 and all(f["file"] == "train_description.xlsx" for f in refusals)
    assert any(f["detail"].startswith("I'm sorry, but I can't assist") for f in refusals)
