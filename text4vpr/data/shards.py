"""WebDataset shard builder: one sample per location (`{key}.json`, then `{key}.{pos}.jpg` per
view), written in parallel, atomically, resumably and byte-identically (docs/data.md).
Reading and verifying: `shard_reader`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from text4vpr.data.build_checks import skipped_share_problem
from text4vpr.data.shard_pack import PARTS, BuildOptions, sample_json, write_shard, writing
from text4vpr.data.shard_reader import MANIFEST, ShardError, sample_ranges
from text4vpr.utils.hashing import file_sha256
from text4vpr.data.street360loc import Location, ReadOptions, ValidationReport, read_street360loc
from text4vpr.utils.atomic import atomic_write_json

PLAN = "build_plan.json"
LOCK = ".lock"
FORMAT_VERSION = 1
NOT_CONTENT = ("workers", "overwrite", "max_skipped_share")  # options that never change what is written


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
    content = {k: v for k, v in asdict(opts).items() if k not in NOT_CONTENT}
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
    for name in _own_shard_names(out):  # only what the earlier build listed: never a file it did not write
        (out / name).unlink(missing_ok=True)
        (out / PARTS / f"{name}.json").unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _own_shard_names(out: Path) -> set[str]:
    """Shard names the folder's own plan and manifest list (plain file names only)."""
    names = set(json.loads((out / PLAN).read_text()).get("shards", []))
    if (out / MANIFEST).exists():
        names |= {s["name"] for s in json.loads((out / MANIFEST).read_text()).get("shards", [])}
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}


def _remove_orphans(out: Path) -> None:
    """Temp files of a build killed mid-way (`.tmp-shard-*.tar.*`, ...); run under the build lock,
    so no other builder is writing them."""
    for folder in (out, out / PARTS):
        for tmp in folder.glob(".tmp-*"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


def _finished(out: Path, name: str, plan: str) -> dict | None:
    """The part record of a finished shard of this plan whose tar still has its checksum, or None."""
    part = out / PARTS / f"{name}.json"
    if not (part.exists() and (out / name).exists()):
        return None
    try:
        record = json.loads(part.read_text())
    except json.JSONDecodeError:
        return None
    ok = (record.get("plan") == plan and (out / name).stat().st_size == record.get("bytes")
          and file_sha256(out / name) == record.get("sha256"))
    return record if ok else None


@contextlib.contextmanager
def build_lock(out: str | Path):
    """Hold an exclusive lock on the output folder (`OUT/.lock`) for one build; a second
    builder fails at once naming the folder. Released when the holder exits or dies."""
    import fcntl

    out = Path(out)
    with writing(out / LOCK):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardError(f"{out}: another build holds {out / LOCK}; wait for it to finish or use another --out") from None
        yield
    finally:
        os.close(fd)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: the worker gets SIGKILL when the builder dies (Linux), and leaves at
    once if the builder is already gone, so a killed build leaves no writers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def build_shards(
    xlsx: str | Path | Sequence[str | Path],
    images_dir: str | Path,
    out_dir: str | Path,
    options: BuildOptions = BuildOptions(),
    read_options: ReadOptions = ReadOptions(),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Validate the annotation files, write shards and `manifest.json`; return the manifest.
    Holds `build_lock(out_dir)` throughout; OS errors raise `ShardWriteError` naming the path."""
    with build_lock(out_dir):
        return _build_locked(xlsx, images_dir, Path(out_dir), options, read_options, progress, log)


def _build_locked(xlsx, images_dir, out: Path, options: BuildOptions, read_options: ReadOptions, progress, log) -> dict:
    t0 = time.perf_counter()
    with writing(out / PARTS):
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        _remove_orphans(out)
    locations, report = read_street360loc(xlsx, images_dir, read_options)
    problem = skipped_share_problem(report, options.max_skipped_share, images_dir)
    if problem:
        raise ShardError(f"shards build: {problem}")
    shards = plan_shards(locations, options)
    plan = _plan_hash(shards, options, read_options)
    _check_previous_build(out, plan, options.overwrite)
    names = [f"{options.prefix}-{i:06d}.tar" for i in range(len(shards))]
    with writing(out / PLAN):
        atomic_write_json(out / PLAN, {"plan": plan, "shards": names})
    records = {n: _with_samples(out, r) for n in names if (r := _finished(out, n, plan)) is not None}
    tasks = [
        {"out": str(out), "name": n, "plan": plan, "options": options, "locations": s,
         "min_views": read_options.min_views, "strict": read_options.strict, "max_pixels": read_options.max_pixels}
        for n, s in zip(names, shards) if n not in records
    ]
    records.update(_run_tasks(tasks, options.workers, len(locations), len(locations) - sum(len(t["locations"]) for t in tasks), progress))
    manifest = _manifest(names, records, report, options, read_options, xlsx, images_dir)
    with writing(out / MANIFEST):
        atomic_write_json(out / MANIFEST, manifest)
    elapsed = time.perf_counter() - t0
    if log is not None:
        log(_summary_line(manifest, len(names) - len(tasks), elapsed))
    return manifest


def _with_samples(out: Path, record: dict) -> dict:
    """A reused shard's record, with its per-sample byte ranges (parts written before they were recorded lack them)."""
    if "samples" not in record:
        record["samples"] = [[o, n, d] for _, o, n, d in sample_ranges(out / record["name"])]
    return record


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
            with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
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
    shards = [{k: records[n][k] for k in ("name", "count", "views", "bytes", "sha256", "keys", "samples") if k in records[n]}
              for n in names]
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
        "options": {k: v for k, v in asdict(opts).items() if k not in NOT_CONTENT},
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
    off = c["flags"].get("off_earth", 0)
    warn = (f"\nWARNING: {off} locations have coordinates that are not on the Earth's surface (flag off_earth in "
            "report.json); the loader refuses them: check the x, y, z columns (ECEF metres)") if off else ""
    return (
        f"shards: {t['locations']} locations, {t['views']} views in {t['shards']} shards ({reused} reused); "
        f"skipped {c['locations_skipped']} locations, {c['rows_dropped']} views; "
        f"{mb:.1f} MB in {elapsed:.1f} s ({mb / max(elapsed, 1e-9):.1f} MB/s)" + warn
    )
