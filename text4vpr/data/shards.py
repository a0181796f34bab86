"""WebDataset shard builder and checker for Street360Loc locations.

One sample per location: `{key}.json` (index, xyz, positions, descriptions, view mask,
split, sources) and `{key}.{pos}.jpg` per present view, in that order. Shards are written
in parallel (one process writes whole shards), atomically (temp name, then rename),
resumably (a finished shard has its tar and its `.parts/{name}.json` record; a rerun with
the same plan keeps those) and deterministically (fixed tar headers and member order, so
the same inputs and options give byte-identical shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from text4vpr.data.street360loc import (
    Location,
    ReadOptions,
    Street360LocError,
    ValidationReport,
    read_street360loc,
)
from text4vpr.utils.atomic import atomic_open, atomic_write_json

MANIFEST = "manifest.json"
PLAN = "build_plan.json"
PARTS = ".parts"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard directory is inconsistent (checksum, count, or a different earlier build)."""


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


def sample_key(loc: Location) -> str:
    """WebDataset key (no dots): split and zero-padded index, unique even with overlap."""
    return f"{loc.split}-{loc.index:06d}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Member header with every variable field fixed, for byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _image_bytes(path: Path, resize: int | None, quality: int) -> bytes:
    """Original bytes (fully decoded once to prove they are readable) or a resized re-encode."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated/corrupt data
        if resize is None:
            return data
        rgb = im.convert("RGB").resize((resize, resize), Image.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


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


def _pack_location(loc: Location, opts: BuildOptions, min_views: int, strict: bool):
    """Encode one location's views; unreadable views are dropped (or raise under strict)."""
    members, views, dropped = [], [], []
    for v in loc.views:
        try:
            members.append((v.pos, _image_bytes(v.image, opts.resize, opts.jpeg_quality)))
            views.append(v)
        except (OSError, ValueError, SyntaxError) as e:
            entry = {"file": loc.source, "row": v.row, "index": loc.index, "pos": v.pos, "reason": f"unreadable image ({type(e).__name__}: {e})"}
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


def write_shard(task: dict) -> dict:
    """Worker: write one shard atomically, then its part record; return the record."""
    out, name, opts = Path(task["out"]), task["name"], task["options"]
    record = {"name": name, "plan": task["plan"], "count": 0, "views": 0, "dropped_views": [], "skipped_locations": []}
    with atomic_open(out / name, "wb") as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for loc in task["locations"]:
                members, views, dropped, skipped = _pack_location(loc, opts, task["min_views"], task["strict"])
                record["dropped_views"] += dropped
                if skipped is not None:
                    record["skipped_locations"].append(skipped)
                    continue
                key = sample_key(loc)
                for member, data in [("json", sample_json(loc, views))] + [(f"{p}.jpg", b) for p, b in members]:
                    tar.addfile(_tarinfo(f"{key}.{member}", len(data)), io.BytesIO(data))
                record["count"] += 1
                record["views"] += len(views)
    os.chmod(out / name, 0o644)  # mkstemp makes 0600; shards are meant to be shared
    record.update(bytes=hw.bytes, sha256=hw.sha.hexdigest())
    atomic_write_json(out / PARTS / f"{name}.json", record)
    return record


def plan_shards(locations: Sequence[Location], opts: BuildOptions) -> list[list[Location]]:
    """Split locations, in order, into shards by count and (estimated) bytes."""
    if opts.max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {opts.max_count}")
    shards: list[list[Location]] = [[]]
    size = 0
    for loc in locations:
        est = 1536 + sum(_estimate_view_bytes(v.image, opts.resize) for v in loc.views)
        full = len(shards[-1]) >= opts.max_count or (opts.max_size is not None and shards[-1] and size + est > opts.max_size)
        if full:
            shards.append([])
            size = 0
        shards[-1].append(loc)
        size += est
    return [s for s in shards if s]


def _estimate_view_bytes(path: Path, resize: int | None) -> int:
    """Bytes a view adds to a shard: its file size, or about 0.3 B/px when resized."""
    if resize is not None:
        return int(0.3 * resize * resize) + 512
    try:
        return path.stat().st_size + 512
    except OSError:
        return 512


def _plan_hash(shards: list[list[Location]], opts: BuildOptions, read_opts: ReadOptions) -> str:
    """Hash of everything that determines shard contents; resume requires it to match."""
    h = hashlib.sha256()
    content = {k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite")}
    h.update(json.dumps([FORMAT_VERSION, content, asdict(read_opts)], sort_keys=True, default=str).encode())
    for shard in shards:
        h.update(b"|shard|")
        for loc in shard:
            h.update(sample_json(loc, loc.views))
            for v in loc.views:
                h.update(f"{v.image.name}:{_file_size(v.image)};".encode())
    return h.hexdigest()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _check_previous_build(out: Path, plan: str, overwrite: bool) -> None:
    """Refuse to mix shards of a different build into this folder (unless overwrite)."""
    old = out / PLAN
    if not old.exists():
        return
    previous = json.loads(old.read_text()).get("plan")
    if previous == plan:
        return
    if not overwrite:
        raise ShardError(f"{out} holds shards of a different build (plan {previous[:12]}); use --overwrite or another --out")
    for p in list(out.glob("*.tar")) + list((out / PARTS).glob("*.json")) + [out / MANIFEST]:
        p.unlink(missing_ok=True)


def _finished(out: Path, name: str, plan: str) -> dict | None:
    """The part record of a finished shard of this plan, or None."""
    part = out / PARTS / f"{name}.json"
    if not (part.exists() and (out / name).exists()):
        return None
    try:
        record = json.loads(part.read_text())
    except json.JSONDecodeError:
        return None
    ok = record.get("plan") == plan and (out / name).stat().st_size == record.get("bytes")
    return record if ok else None


def build_shards(
    xlsx: str | Path | Sequence[str | Path],
    images_dir: str | Path,
    out_dir: str | Path,
    options: BuildOptions = BuildOptions(),
    read_options: ReadOptions = ReadOptions(),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Validate the annotation files, write shards and `manifest.json`; return the manifest."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    locations, report = read_street360loc(xlsx, images_dir, read_options)
    shards = plan_shards(locations, options)
    plan = _plan_hash(shards, options, read_options)
    _check_previous_build(out, plan, options.overwrite)
    names = [f"{options.prefix}-{i:06d}.tar" for i in range(len(shards))]
    atomic_write_json(out / PLAN, {"plan": plan, "shards": names})
    records = {n: r for n in names if (r := _finished(out, n, plan)) is not None}
    tasks = [
        {"out": str(out), "name": n, "plan": plan, "options": options, "locations": s,
         "min_views": read_options.min_views, "strict": read_options.strict}
        for n, s in zip(names, shards) if n not in records
    ]
    records.update(_run_tasks(tasks, options.workers, len(locations), len(locations) - sum(len(t["locations"]) for t in tasks), progress))
    manifest = _manifest(names, records, report, options, read_options, xlsx, images_dir)
    atomic_write_json(out / MANIFEST, manifest)
    elapsed = time.perf_counter() - t0
    if log is not None:
        log(_summary_line(manifest, len(names) - len(tasks), elapsed))
    return manifest


def _run_tasks(tasks: list[dict], workers: int, total: int, done: int, progress: bool) -> dict:
    """Write shards, in parallel when workers > 1; a progress bar counts locations."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="loc", desc="shards", disable=not progress)
    records = {}
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                records[t["name"]] = write_shard(t)
                bar.update(len(t["locations"]))
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(write_shard, t): t for t in tasks}
                for fut in as_completed(futures):
                    t = futures[fut]
                    records[t["name"]] = fut.result()
                    bar.update(len(t["locations"]))
    finally:
        bar.close()
    return records


def _manifest(names, records, report: ValidationReport, opts, read_opts, xlsx, images_dir) -> dict:
    """Assemble manifest.json: per-shard counts and checksums, totals, options, report."""
    report = _apply_worker_drops(report, [records[n] for n in names])
    shards = [{"name": n, "count": records[n]["count"], "views": records[n]["views"], "bytes": records[n]["bytes"], "sha256": records[n]["sha256"]} for n in names]
    xlsx_list = [str(xlsx)] if isinstance(xlsx, (str, Path)) else [str(p) for p in xlsx]
    return {
        "format": "text4vpr-street360loc-wds",
        "version": FORMAT_VERSION,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "locations": sum(s["count"] for s in shards),
            "views": sum(s["views"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite")},
        "read_options": asdict(read_opts),
        "inputs": {"xlsx": xlsx_list, "images": str(images_dir)},
        "report": report.to_dict(),
    }


def _apply_worker_drops(report: ValidationReport, records: list[dict]) -> ValidationReport:
    """Move views/locations that failed to decode in the workers into the report."""
    for r in records:
        report.dropped_views += r["dropped_views"]
        report.skipped_locations += r["skipped_locations"]
        report.rows_written -= len(r["dropped_views"]) + sum(len(s["rows"]) for s in r["skipped_locations"])
        report.locations_written -= len(r["skipped_locations"])
    assert report.balanced(), "validation report does not add up after decoding"
    return report


def _summary_line(manifest: dict, reused: int, elapsed: float) -> str:
    t, c = manifest["totals"], manifest["report"]["counts"]
    mb = t["bytes"] / 1e6
    return (
        f"shards: {t['locations']} locations, {t['views']} views in {t['shards']} shards ({reused} reused); "
        f"skipped {c['locations_skipped']} locations, {c['rows_dropped']} views; "
        f"{mb:.1f} MB in {elapsed:.1f} s ({mb / max(elapsed, 1e-9):.1f} MB/s)"
    )


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest (was `text4vpr shards build` run to completion?)")
    return json.loads(path.read_text())


def iter_tar_samples(source):
    """Yield (key, {suffix: bytes}) per sample of a tar, in order. `source` is a path or a binary
    stream (read once, front to back); the key is a member's base name up to its first dot."""
    if isinstance(source, (str, Path)):
        tar = tarfile.open(source, mode="r|*")
    else:
        tar = tarfile.open(fileobj=source, mode="r|*")
    with tar:
        key, sample = None, {}
        for info in tar:
            if not info.isreg():
                continue
            base, _, suffix = os.path.basename(info.name).partition(".")
            if base != key and sample:
                yield key, sample
                sample = {}
            key = base
            sample[suffix] = tar.extractfile(info).read()
        if sample:
            yield key, sample


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(shard_dir: str | Path) -> dict:
    """Check every shard's sha256, bytes and sample count against the manifest."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    problems = []
    for s in manifest["shards"]:
        path = shard_dir / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        if path.stat().st_size != s["bytes"] or _sha256(path) != s["sha256"]:
            problems.append(f"{s['name']}: checksum mismatch")
            continue
        count = sum(1 for _ in iter_tar_samples(path))
        if count != s["count"]:
            problems.append(f"{s['name']}: {count} samples, manifest says {s['count']}")
    return {"ok": not problems, "problems": problems, "checked": len(manifest["shards"]), "totals": manifest["totals"], "report": manifest["report"]["counts"]}


def find_location(shard_dir: str | Path, index: int) -> list[tuple[str, dict, dict]]:
    """All samples with this index: (shard name, json meta, {pos: jpeg bytes})."""
    shard_dir = Path(shard_dir)
    found = []
    for s in load_manifest(shard_dir)["shards"]:
        for key, sample in iter_tar_samples(shard_dir / s["name"]):
            if key.endswith(f"-{index:06d}"):
                meta = json.loads(sample["json"])
                images = {int(k.split(".")[0]): v for k, v in sample.items() if k.endswith(".jpg")}
                found.append((s["name"], meta, images))
    return found


def shard_descriptions(source: str | Path) -> list[str]:
    """All descriptions in a shard folder or an xlsx file (e.g. to train a tokenizer)."""
    source = Path(source)
    if source.suffix == ".xlsx":
        locations, _ = read_street360loc(source, None, ReadOptions(check_images=False))
        return [v.description for loc in locations for v in loc.views]
    texts = []
    for s in load_manifest(source)["shards"]:
        for _, sample in iter_tar_samples(source / s["name"]):
            texts += json.loads(sample["json"])["descriptions"]
    return texts


def shard_paths(shard_dir: str | Path) -> list[str]:
    """Shard file paths of a built folder, in manifest order."""
    shard_dir = Path(shard_dir)
    return [str(shard_dir / s["name"]) for s in load_manifest(shard_dir)["shards"]]


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
