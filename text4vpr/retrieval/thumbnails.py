"""Location cards for reports: each wanted location's descriptions and small JPEG thumbnails
of its views, read from shard folders in one pass, plus the data report's flags for it."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from text4vpr.data.shard_reader import is_shard_dir, iter_tar_samples, load_manifest, open_shard

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
    """A `data:image/jpeg;base64,...` thumbnail no larger than size x size (a JPEG that is
    already that small is embedded as it is)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:  # reads the header only
        if im.format == "JPEG" and max(im.size) <= size:
            data = jpeg
        else:
            im.draft("RGB", (size, size))  # JPEG DCT scaling: decode at reduced size when large
            small = im.convert("RGB")
            small.thumbnail((size, size))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=quality)
            data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _wanted_samples(path, wanted: set[int]) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(location index, {suffix: bytes}) of the wanted samples of a shard (keys end in the
    zero-padded index, `sample_key`)."""
    for key, sample in iter_tar_samples(path):
        index = int(key.rsplit("-", 1)[-1]) if key[-6:].isdigit() else None
        if index in wanted:
            yield index, sample


def _may_hold(record: dict, wanted: set[int]) -> bool:
    """False when the manifest lists the shard's keys and none is wanted: its tar is not read."""
    keys = record.get("keys")
    return keys is None or any(k[-6:].isdigit() and int(k.rsplit("-", 1)[-1]) in wanted for k in keys)


def flags_by_index(manifest: dict) -> dict[int, list[str]]:
    """Flags and dropped views of the shard build's validation report, keyed by location index."""
    report = manifest.get("report", {})
    out: dict[int, list[str]] = {}
    for f in report.get("flags", []):
        out.setdefault(int(f["index"]), []).append(f"pos {f.get('pos', '?')}: {f['flag']}")
    for d in report.get("dropped_views", []):
        out.setdefault(int(d["index"]), []).append(f"pos {d.get('pos', '?')}: dropped ({d['reason']})")
    return out


def shard_flags(shard_dirs: Iterable[str | Path]) -> dict[int, list[str]]:
    """`flags_by_index` of each shard folder's manifest (folders without one add nothing)."""
    out: dict[int, list[str]] = {}
    for shard_dir in shard_dirs:
        if is_shard_dir(shard_dir):
            for index, flags in flags_by_index(load_manifest(shard_dir)).items():
                out.setdefault(index, flags)
    return out


def load_cards(shard_dirs: Iterable[str | Path], wanted: Iterable[int], size: int = THUMB_PX) -> dict[int, LocationCard]:
    """Cards of the `wanted` location indices found in the shard folders (first sighting wins);
    locations not found are simply absent (the report says 'not in the shards')."""
    todo = {int(i) for i in wanted}
    cards: dict[int, LocationCard] = {}
    for shard_dir in shard_dirs:
        manifest = load_manifest(shard_dir)
        flags = flags_by_index(manifest)
        for s in manifest["shards"]:
            if not todo:
                return cards
            if not _may_hold(s, todo):
                continue
            for index, sample in _wanted_samples(open_shard(shard_dir, s), set(todo)):
                if index not in todo or "json" not in sample:
                    continue
                meta = json.loads(sample["json"])
                todo.discard(index)
                card = LocationCard(index, dict(zip(meta["positions"], meta["descriptions"])), flags=flags.get(index, []))
                for name, data in sample.items():
                    if name.endswith(".jpg"):
                        card.thumbnails[int(name.split(".")[0])] = thumbnail_uri(data, size)
                cards[index] = card
    return cards
