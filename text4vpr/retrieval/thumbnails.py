"""Location cards for reports: each wanted location's descriptions and small JPEG thumbnails
of its views, read from shard folders in one pass, plus the data report's flags for it."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from text4vpr.data.shards import iter_tar_samples, load_manifest

THUMB_PX = 96
THUMB_QUALITY = 70


@dataclass
class LocationCard:
    """One location as a report shows it: descriptions and thumbnails by pos (1..4)."""

    index: int
    descriptions: dict[int, str] = field(default_factory=dict)
    thumbnails: dict[int, str] = field(default_factory=dict)  # pos -> data: URI (JPEG, base64)
    flags: list[str] = field(default_factory=list)  # what the data report said about it


def thumbnail_uri(jpeg: bytes, size: int = THUMB_PX, quality: int = THUMB_QUALITY) -> str:
    """A `data:image/jpeg;base64,...` thumbnail no larger than size x size."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("RGB", (size, size))  # JPEG DCT scaling: decode at reduced size when large
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _flags_by_index(manifest: dict) -> dict[int, list[str]]:
    """Flags and dropped views of the shard build's validation report, keyed by location index."""
    report = manifest.get("report", {})
    out: dict[int, list[str]] = {}
    for f in report.get("flags", []):
        out.setdefault(int(f["index"]), []).append(f"pos {f.get('pos', '?')}: {f['flag']}")
    for d in report.get("dropped_views", []):
        out.setdefault(int(d["index"]), []).append(f"pos {d.get('pos', '?')}: dropped ({d['reason']})")
    return out


def load_cards(shard_dirs: Iterable[str | Path], wanted: Iterable[int], size: int = THUMB_PX) -> dict[int, LocationCard]:
    """Cards of the `wanted` location indices found in the shard folders (first sighting wins);
    locations not found are simply absent (the report says 'not in the shards')."""
    todo = {int(i) for i in wanted}
    cards: dict[int, LocationCard] = {}
    for shard_dir in shard_dirs:
        shard_dir = Path(shard_dir)
        manifest = load_manifest(shard_dir)
        flags = _flags_by_index(manifest)
        for s in manifest["shards"]:
            if not todo:
                return cards
            for _, sample in iter_tar_samples(shard_dir / s["name"]):
                meta = json.loads(sample["json"])
                index = int(meta["index"])
                if index not in todo:
                    continue
                todo.discard(index)
                card = LocationCard(index, dict(zip(meta["positions"], meta["descriptions"])), flags=flags.get(index, []))
                for name, data in sample.items():
                    if name.endswith(".jpg"):
                        card.thumbnails[int(name.split(".")[0])] = thumbnail_uri(data, size)
                cards[index] = card
    return cards
