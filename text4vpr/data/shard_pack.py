"""Packing one shard (in a builder worker): JPEG bytes per view, the JSON member, a deterministic
tar written atomically, then its `.parts/{name}.json` record."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from text4vpr.data.image_checks import format_problem, pixel_problem
from text4vpr.data.sample_key import sample_key as location_key
from text4vpr.data.shard_reader import ShardError, sample_ranges
from text4vpr.data.street360loc import Location, Street360LocError
from text4vpr.utils.atomic import atomic_open, atomic_write_json

PARTS = ".parts"


class ShardWriteError(ShardError):
    """An OS error (full disk, permissions, ...) while writing `path`: one line, no traceback."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: cannot write: {reason}")
        self.path, self.reason = str(path), str(reason)

    def __reduce__(self):  # crosses the process pool intact
        return type(self), (self.path, self.reason)


@contextlib.contextmanager
def writing(path):
    """Turn an OSError raised while writing `path` into a `ShardWriteError` naming it."""
    try:
        yield
    except OSError as e:
        raise ShardWriteError(path, e.strerror or e) from e


class BadImage(ValueError):
    """A view the packer refuses (over the pixel limit); the message is the report's reason."""


@dataclass(frozen=True)
class BuildOptions:
    """How locations are packed (the `text4vpr shards build` flags)."""

    resize: int | None = None  # square side in px; None keeps the original JPEG bytes
    jpeg_quality: int = 90  # used only with resize
    max_count: int = 64  # locations per shard
    max_size: int | None = None  # bytes per shard, estimated from source image sizes
    workers: int = 1
    prefix: str = "shard"
    overwrite: bool = False  # discard an earlier, different build in the same folder
    max_skipped_share: float = 1.0  # refuse when more of the locations (or views) are skipped; the CLI says 0.05


def sample_key(loc: Location) -> str:
    """The location's WebDataset key (`data.sample_key`)."""
    return location_key(loc.split, loc.index)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Member header with every variable field fixed, for byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _image_bytes(path: Path, resize: int | None, quality: int, max_pixels: int) -> bytes:
    """Original bytes (fully decoded once to prove they are readable) or a resized re-encode."""
    from PIL import Image

    data = path.read_bytes()
    problem = pixel_problem(io.BytesIO(data), max_pixels)
    if problem is not None:
        raise BadImage(problem)
    with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked above
        im.load()  # raises on truncated/corrupt data
        problem = degenerate_problem(im)
        if problem is not None:
            raise BadImage(problem)
        if resize is None:
            return data
        rgb = im.convert("RGB").resize((resize, resize), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def degenerate_problem(im) -> str | None:
    """Why a decoded view would reach the model as something else than the photo, or None: not
    an 8-bit JPEG (`format_problem`), or one flat value."""
    problem = format_problem(im)
    if problem is not None:
        return problem
    low, high = im.convert("L").getextrema()
    if low == high:
        return f"degenerate image: every pixel has the value {low}"
    return None


def sample_json(loc: Location, views) -> bytes:
    """The JSON member of one location (compact, sorted keys: deterministic)."""
    have = {v.pos for v in views}
    meta = {
        "index": loc.index,
        "xyz": list(loc.xyz),
        "positions": [v.pos for v in views],
        "descriptions": [v.description for v in views],
        "view_mask": [p in have for p in range(1, 5)],
        "split": loc.split,
        "source": {"xlsx": loc.source, "images": [v.image.name for v in views], "rows": [v.row for v in views]},
    }
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.bytes


def _pack_location(loc: Location, opts: BuildOptions, task: dict):
    """Encode one location's views; unreadable views are dropped (or raise under strict)."""
    members, views, dropped = [], [], []
    min_views, strict = task["min_views"], task["strict"]
    for v in loc.views:
        try:
            members.append((v.pos, _image_bytes(v.image, opts.resize, opts.jpeg_quality, task["max_pixels"])))
            views.append(v)
        except (OSError, ValueError, SyntaxError) as e:
            reason = str(e) if isinstance(e, BadImage) else f"unreadable image ({type(e).__name__}: {e})"
            entry = {"file": loc.source, "row": v.row, "index": loc.index, "pos": v.pos, "reason": reason}
            if strict:
                raise Street360LocError(f"{loc.source}: row {v.row}: index {loc.index}: {entry['reason']} (--strict)") from e
            dropped.append(entry)
    if len(views) < min_views or not views:
        reason = "no valid views" if not views else f"{len(views)} views < --min-views {min_views}"
        entry = {"file": loc.source, "index": loc.index, "rows": [v.row for v in views], "reason": reason + " after decoding"}
        if strict:
            raise Street360LocError(f"{loc.source}: index {loc.index}: {entry['reason']} (--strict)")
        return None, views, dropped, entry
    return members, views, dropped, None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _pack_into(tar: tarfile.TarFile, task: dict, record: dict) -> None:
    """Append every location of the task to `tar`, counting into `record`."""
    for loc in task["locations"]:
        members, views, dropped, skipped = _pack_location(loc, task["options"], task)
        record["dropped_views"] += dropped
        if skipped is not None:
            record["skipped_locations"].append(skipped)
            continue
        key = sample_key(loc)
        for member, data in [("json", sample_json(loc, views))] + [(f"{p}.jpg", b) for p, b in members]:
            _add_member(tar, f"{key}.{member}", data)
        record["count"] += 1
        record["views"] += len(views)
        record["keys"].append(key)


def write_shard(task: dict) -> dict:
    """Worker: write one shard atomically, then its part record; return the record.
    OS errors (a full disk) raise `ShardWriteError` naming the file."""
    out, name = Path(task["out"]), task["name"]
    record = {"name": name, "plan": task["plan"], "count": 0, "views": 0, "dropped_views": [], "skipped_locations": [],
              "keys": []}
    with writing(out / name):
        with atomic_open(out / name, "wb") as f:
            hw = _HashingWriter(f)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                _pack_into(tar, task, record)
    record.update(bytes=hw.bytes, sha256=hw.sha.hexdigest())
    with writing(out / name):
        record["samples"] = [[o, n, d] for _, o, n, d in sample_ranges(out / name)]  # for readers that seek
    with writing(out / PARTS / f"{name}.json"):
        atomic_write_json(out / PARTS / f"{name}.json", record)
    return record
