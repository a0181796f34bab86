"""Synthetic Street360Loc: procedurally rendered street views with matching descriptions.

Written in exactly the real layout (`{split}_description.xlsx` and
`Street360Loc_images/{index:06d}_{pos}.jpg`) so demos and tests use the real ingestion
path. Each view shows 3-4 big, clearly coloured objects left to right; its description is
generated from the same attributes, so the task is learnable by a tiny model. Locations
lie 8-12 m apart along streets of a grid around Pittsburgh; each pos (view direction) of a
street has one shared sequence of objects every ~5 m, so neighbours share scenery.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from text4vpr.data.geo import enu_to_ecef
from text4vpr.utils.atomic import atomic_write_bytes

CITY_LAT, CITY_LON, CITY_HEIGHT = 40.4406, -79.9959, 250.0  # Pittsburgh, where Street360Loc is
OBJECT_SPACING_M = 5.0  # one object every 5 m along each side of a street
VIEW_HALF_WIDTH_M = 10.0  # a view shows the objects within +-10 m: neighbours share about half
STREET_GAP_M = 80.0  # distance between parallel streets of the grid
LOCATIONS_PER_STREET = 25

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
KINDS = ("building", "tree", "car", "sign", "lamp", "bus", "house")
SKIES: dict[str, tuple[int, int, int]] = {
    "clear blue": (120, 180, 240),
    "grey and overcast": (160, 160, 165),
    "orange at sunset": (240, 170, 110),
}
GROUNDS: dict[str, tuple[int, int, int]] = {
    "grey asphalt": (90, 90, 95),
    "red brick": (150, 70, 50),
    "green grass": (80, 140, 60),
}
KIND_WORDS = {  # (noun, optional adjective choices) for the description
    "building": ("building", ("tall", "large", "")),
    "tree": ("tree", ("leafy", "big", "")),
    "car": ("car", ("parked", "small", "")),
    "sign": ("street sign", ("square", "")),
    "lamp": ("lamp post", ("tall", "")),
    "bus": ("bus", ("long", "city", "")),
    "house": ("house", ("small", "pitched-roof", "")),
}
OPENINGS = (
    "From left to right, the main features include:",
    "From left to right, the features are:",
    "From left to right, the four main features are:",
)
REFUSALS = (
    "I'm sorry, I can't assist with that.",
    "I'm sorry, but I can't provide a description of the features in the image.",
    "I'm unable to view the image. If you provide me with details about its content, I can help.",
)


@dataclass(frozen=True)
class SynthConfig:
    """What `write_synthetic` generates; deterministic for a given config."""

    locations: int = 300
    seed: int = 0
    image_size: int = 640
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test
    refusal_rate: float = 0.0  # fraction of views whose description is a refusal (real data has a few)
    jpeg_quality: int = 90
    workers: int = 1


@dataclass(frozen=True)
class SceneObject:
    kind: str
    color: str
    offset_m: float  # position along the street


@dataclass
class SynthLocation:
    index: int
    split: str
    xyz: tuple[float, float, float]
    views: list[dict] = field(default_factory=list)  # per pos: objects, sky, ground, description


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Integer split sizes summing to n; a split with a positive fraction gets at least one when n >= 3."""
    sizes = [int(round(n * f)) for f in fractions[:2]]
    if n >= 3:
        sizes = [max(1, s) if f > 0 else 0 for s, f in zip(sizes, fractions)]
    sizes.append(n - sum(sizes))
    if sizes[2] < 0:
        raise ValueError(f"split fractions {fractions} do not fit {n} locations")
    return sizes


def _street_sides(rng: np.random.Generator, length_m: float) -> list[list[SceneObject]]:
    """Four object sequences (one per pos) along a street, one object every OBJECT_SPACING_M."""
    count = int(length_m / OBJECT_SPACING_M) + 8
    sides = []
    for _ in range(4):
        kinds = rng.choice(len(KINDS), size=count)
        colors = rng.choice(len(COLORS), size=count)
        names = list(COLORS)
        sides.append(
            [
                SceneObject(KINDS[k], names[c], (i - 4) * OBJECT_SPACING_M)
                for i, (k, c) in enumerate(zip(kinds, colors))
            ]
        )
    return sides


def _describe(objects: list[SceneObject], sky: str, ground: str, rng: np.random.Generator) -> str:
    """Street360Loc-style description generated from the rendered attributes."""
    parts = []
    for i, obj in enumerate(objects, 1):
        noun, adjectives = KIND_WORDS[obj.kind]
        adj = adjectives[int(rng.integers(len(adjectives)))]
        first = adj or obj.color
        article = "an" if first[0] in "aeiou" else "a"
        words = " ".join(w for w in (article, adj, obj.color, noun) if w)
        parts.append(f"{i}. {words[0].upper()}{words[1:]}")
    opening = OPENINGS[int(rng.integers(len(OPENINGS)))]
    return f"{opening} " + "; ".join(parts) + f". The sky is {sky} and the ground is {ground}."


def plan_locations(cfg: SynthConfig) -> list[SynthLocation]:
    """Lay out locations on streets, pick their scenery and write their descriptions."""
    rng = np.random.default_rng(cfg.seed)
    sizes = _split_sizes(cfg.locations, cfg.split_fractions)
    out: list[SynthLocation] = []
    index = 1
    street = 0
    for split, size in zip(("train", "val", "test"), sizes):
        remaining = size
        while remaining > 0:  # each split gets its own streets: no scenery shared across splits
            n = min(LOCATIONS_PER_STREET, remaining)
            gaps = rng.uniform(8.0, 12.0, size=n)
            along = np.cumsum(gaps) - gaps[0]  # (n,) metres along the street
            sides = _street_sides(rng, float(along[-1]) + 2 * VIEW_HALF_WIDTH_M)
            ground = list(GROUNDS)[int(rng.integers(len(GROUNDS)))]
            east_west = street % 2 == 0
            for d in along:
                east, north = (d, street * STREET_GAP_M) if east_west else (street * STREET_GAP_M, d)
                xyz = enu_to_ecef(east, north, 0.0, CITY_LAT, CITY_LON, CITY_HEIGHT)
                loc = SynthLocation(index, split, tuple(float(v) for v in xyz))
                sky = list(SKIES)[int(rng.integers(len(SKIES)))]
                for pos in range(1, 5):
                    seen = [o for o in sides[pos - 1] if abs(o.offset_m - d) < VIEW_HALF_WIDTH_M][:4]
                    text = _describe(seen, sky, ground, rng)
                    if cfg.refusal_rate > 0 and rng.random() < cfg.refusal_rate:
                        text = REFUSALS[int(rng.integers(len(REFUSALS)))]
                    loc.views.append({"pos": pos, "objects": seen, "sky": sky, "ground": ground, "text": text})
                out.append(loc)
                index += 1
            remaining -= n
            street += 1
    return out


def _draw_object(draw, obj: SceneObject, box: tuple[float, float, float, float]) -> None:
    """Draw one object filling most of its slot `box` (x0, y0, x1, y1 in pixels)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    c = COLORS[obj.color]
    dark = (40, 40, 40) if obj.color != "black" else (200, 200, 200)
    if obj.kind == "building":
        draw.rectangle([x0 + 0.1 * w, y0, x1 - 0.1 * w, y1], fill=c)
        for r in range(4):
            for q in range(2):
                wx = x0 + (0.25 + 0.35 * q) * w
                wy = y0 + (0.1 + 0.2 * r) * h
                draw.rectangle([wx, wy, wx + 0.15 * w, wy + 0.08 * h], fill=dark)
    elif obj.kind == "house":
        top = y0 + 0.45 * h
        draw.rectangle([x0 + 0.1 * w, top, x1 - 0.1 * w, y1], fill=c)
        draw.polygon([(x0, top), (x1, top), (cx, y0 + 0.1 * h)], fill=dark)
    elif obj.kind == "tree":
        draw.rectangle([cx - 0.06 * w, y0 + 0.55 * h, cx + 0.06 * w, y1], fill=(100, 60, 30))
        draw.ellipse([x0 + 0.05 * w, y0 + 0.05 * h, x1 - 0.05 * w, y0 + 0.65 * h], fill=c)
    elif obj.kind == "car":
        body = [x0 + 0.05 * w, y1 - 0.35 * h, x1 - 0.05 * w, y1 - 0.08 * h]
        draw.rectangle([x0 + 0.25 * w, y1 - 0.5 * h, x1 - 0.25 * w, y1 - 0.3 * h], fill=c)
        draw.rectangle(body, fill=c)
        for fx in (0.25, 0.75):
            draw.ellipse([x0 + (fx - 0.1) * w, y1 - 0.16 * h, x0 + (fx + 0.1) * w, y1], fill=dark)
    elif obj.kind == "bus":
        draw.rectangle([x0, y1 - 0.6 * h, x1, y1 - 0.08 * h], fill=c)
        for q in range(3):
            wx = x0 + (0.08 + 0.3 * q) * w
            draw.rectangle([wx, y1 - 0.52 * h, wx + 0.22 * w, y1 - 0.36 * h], fill=dark)
        for fx in (0.2, 0.8):
            draw.ellipse([x0 + (fx - 0.08) * w, y1 - 0.16 * h, x0 + (fx + 0.08) * w, y1], fill=dark)
    elif obj.kind == "sign":
        draw.rectangle([cx - 0.04 * w, y0 + 0.3 * h, cx + 0.04 * w, y1], fill=(110, 110, 110))
        draw.rectangle([x0 + 0.15 * w, y0 + 0.05 * h, x1 - 0.15 * w, y0 + 0.45 * h], fill=c)
    elif obj.kind == "lamp":
        draw.rectangle([cx - 0.05 * w, y0 + 0.15 * h, cx + 0.05 * w, y1], fill=c)
        draw.ellipse([cx - 0.2 * w, y0, cx + 0.2 * w, y0 + 0.25 * h], fill=c)
    else:
        raise ValueError(f"unknown object kind {obj.kind!r}")


def render_view(view: dict, size: int, jitter_seed: int) -> "Image.Image":  # noqa: F821
    """Render one view: sky, ground, and its objects in equal slots left to right."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(jitter_seed)
    img = Image.new("RGB", (size, size), SKIES[view["sky"]])
    draw = ImageDraw.Draw(img)
    horizon = size * 0.62
    draw.rectangle([0, horizon, size, size], fill=GROUNDS[view["ground"]])
    objects = view["objects"]
    slot = size / max(len(objects), 1)
    for i, obj in enumerate(objects):
        dx, dy = rng.uniform(-0.05, 0.05, size=2) * slot  # small jitter: neighbours differ slightly
        box = (i * slot + 0.05 * slot + dx, size * 0.2 + dy, (i + 1) * slot - 0.05 * slot + dx, size * 0.9)
        _draw_object(draw, obj, box)
    return img


def _render_location(args: tuple[SynthLocation, str, int, int, int]) -> int:
    """Worker: render and write the four JPEGs of one location; returns bytes written."""
    loc, image_dir, size, quality, seed = args
    total = 0
    for view in loc.views:
        img = render_view(view, size, jitter_seed=seed * 1_000_003 + loc.index * 10 + view["pos"])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        atomic_write_bytes(Path(image_dir) / f"{loc.index:06d}_{view['pos']}.jpg", buf.getvalue())
        total += buf.tell()
    return total


def _write_xlsx(path: Path, locations: list[SynthLocation]) -> None:
    """One row per view with the real Street360Loc columns."""
    import pandas as pd

    rows = [
        {"index": loc.index, "pos": v["pos"], "x": loc.xyz[0], "y": loc.xyz[1], "z": loc.xyz[2], "text_description": v["text"]}
        for loc in locations
        for v in loc.views
    ]
    frame = pd.DataFrame(rows, columns=["index", "pos", "x", "y", "z", "text_description"])
    buf = io.BytesIO()
    frame.to_excel(buf, index=False, engine="openpyxl")
    atomic_write_bytes(path, buf.getvalue())


def write_synthetic(out_dir: str | os.PathLike, cfg: SynthConfig = SynthConfig(), progress: bool = False) -> dict:
    """Write a synthetic Street360Loc under `out_dir`; returns a summary (counts per split)."""
    out = Path(out_dir)
    image_dir = out / "Street360Loc_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    locations = plan_locations(cfg)
    jobs = [(loc, str(image_dir), cfg.image_size, cfg.jpeg_quality, cfg.seed) for loc in locations]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            sizes = list(_progress(pool.map(_render_location, jobs, chunksize=8), len(jobs), progress))
    else:
        sizes = list(_progress(map(_render_location, jobs), len(jobs), progress))
    summary = {"out": str(out), "image_bytes": int(sum(sizes)), "splits": {}}
    for split in ("train", "val", "test"):
        chosen = [loc for loc in locations if loc.split == split]
        _write_xlsx(out / f"{split}_description.xlsx", chosen)
        summary["splits"][split] = {
            "locations": len(chosen),
            "first_index": chosen[0].index if chosen else None,
            "last_index": chosen[-1].index if chosen else None,
        }
    return summary


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synth", unit="loc")
