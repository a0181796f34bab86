"""Synthetic Street360Loc: real layout, determinism, geometry, descriptions match the pixels."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from text4vpr.data.geo import ecef_distance, ecef_to_geodetic, enu_to_ecef, geodetic_to_ecef
from text4vpr.data.street360loc import read_street360loc
from text4vpr.data.synthetic import COLORS, CITY_LAT, CITY_LON, SynthConfig, plan_locations, render_view, write_synthetic


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix == ".jpg":
            h.update(p.name.encode() + p.read_bytes())
    for split in ("train", "val", "test"):
        h.update(pd.read_excel(root / f"{split}_description.xlsx").to_csv().encode())
    return h.hexdigest()


def test_geodetic_ecef_round_trip():
    lat = np.array([40.4406, -33.9, 0.0, 89.99999, -90.0])
    lon = np.array([-79.9959, 151.2, 0.0, 12.0, 45.0])
    h = np.array([250.0, -20.0, 0.0, 1000.0, 5.0])
    back = ecef_to_geodetic(geodetic_to_ecef(lat, lon, h))
    assert np.allclose(back[:, 0], lat, atol=1e-9) and np.allclose(back[:, 2], h, atol=1e-6)
    assert np.allclose(back[:-1, 1], lon[:-1], atol=1e-9)  # longitude is undefined at the pole
    # known value: the equator at the prime meridian is (a, 0, 0)
    assert np.allclose(geodetic_to_ecef(0.0, 0.0, 0.0), [6378137.0, 0.0, 0.0])
    east = enu_to_ecef(10.0, 0.0, 0.0, CITY_LAT, CITY_LON, 0.0)
    assert abs(ecef_distance(east, geodetic_to_ecef(CITY_LAT, CITY_LON, 0.0)) - 10.0) < 1e-6


def test_real_layout_and_disjoint_splits(synth_root):
    for split in ("train", "val", "test"):
        assert (synth_root / f"{split}_description.xlsx").exists()
    locs, rep = read_street360loc(
        [synth_root / f"{s}_description.xlsx" for s in ("train", "val", "test")], synth_root / "Street360Loc_images"
    )
    assert len(locs) == 40 and rep.balanced() and not rep.flags and not rep.dropped_views
    by_split = {s: {loc.index for loc in locs if loc.split == s} for s in ("train", "val", "test")}
    assert [len(v) for v in by_split.values()] == [28, 6, 6]
    assert max(by_split["train"]) < min(by_split["val"]) <= max(by_split["val"]) < min(by_split["test"])
    with Image.open(synth_root / "Street360Loc_images" / "000001_1.jpg") as im:
        assert im.size == (64, 64)


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic(tmp_path / "a", SynthConfig(locations=12, seed=3, image_size=32))
    b = write_synthetic(tmp_path / "b", SynthConfig(locations=12, seed=3, image_size=32, workers=2))
    c = write_synthetic(tmp_path / "c", SynthConfig(locations=12, seed=4, image_size=32))
    assert a["splits"] == b["splits"] == c["splits"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_street_grid_spacing_and_shared_scenery():
    locs = plan_locations(SynthConfig(locations=60, seed=1))
    xyz = np.array([loc.xyz for loc in locs])
    lat, lon, _ = ecef_to_geodetic(xyz).T
    assert np.all(np.abs(lat - CITY_LAT) < 0.01) and np.all(np.abs(lon - CITY_LON) < 0.01)
    same_street = [(a, b) for a, b in zip(locs, locs[1:]) if a.split == b.split]
    gaps = [float(ecef_distance(a.xyz, b.xyz)) for a, b in same_street]
    close = [g for g in gaps if g < 20]
    assert len(close) >= 40 and all(8.0 - 1e-6 <= g <= 12.0 + 1e-6 for g in close)
    shared = sum(
        bool({(o.kind, o.color, o.offset_m) for o in a.views[0]["objects"]} & {(o.kind, o.color, o.offset_m) for o in b.views[0]["objects"]})
        for a, b in same_street
        if float(ecef_distance(a.xyz, b.xyz)) < 20
    )
    assert shared >= 0.8 * len(close)  # neighbours see some of the same objects


def test_description_names_the_rendered_objects_left_to_right():
    (loc,) = plan_locations(SynthConfig(locations=1, seed=5, split_fractions=(1.0, 0.0, 0.0)))
    view = loc.views[0]
    text = view["text"]
    names = [f"{o.color} " for o in view["objects"]]
    positions = [text.index(f"{i}. ") for i in range(1, len(names) + 1)]
    assert positions == sorted(positions) and all(n in text for n in names)
    img = np.asarray(render_view(view, 128, jitter_seed=0)).astype(int)
    slot = 128 / len(view["objects"])
    for i, obj in enumerate(view["objects"]):  # each slot contains its object's colour
        region = img[20:120, int(i * slot) : int((i + 1) * slot)]
        dist = np.abs(region - np.array(COLORS[obj.color])).sum(-1)
        assert (dist < 60).sum() > 30, (i, obj)


@pytest.mark.parametrize("rate,expect_some", [(0.0, False), (0.2, True)])
def test_refusals_only_when_configured(rate, expect_some):
    locs = plan_locations(SynthConfig(locations=40, seed=2, refusal_rate=rate))
    refusals = [v for loc in locs for v in loc.views if v["text"].startswith("I'm")]
    assert bool(refusals) == expect_some
    if expect_some:
        assert 0.05 < len(refusals) / 160 < 0.4
