"""Reading built shard folders: manifest, tar samples, checksum verification, lookups."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from text4vpr.data.sample_check import read_sample_json
from text4vpr.data.street360loc import ReadOptions, read_street360loc
from text4vpr.utils.errors import InputError, file_records_problem

MANIFEST = "manifest.json"
BLOCK = 512  # tar block: every header, and every member's data padded to a multiple of it


class ShardError(InputError, RuntimeError):
    """A shard directory is inconsistent (checksum, count, or a different earlier build)."""


def load_manifest(shard_dir: str | Path) -> dict:
    """The folder's manifest, checked: readable JSON whose shard records name plain files inside
    the folder (a crafted name never becomes a path elsewhere) and count their samples."""
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest (was `text4vpr shards build` run to completion?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable ({e}); rebuild the folder with `text4vpr shards build`") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ShardError(f"{path}: {problem}; rebuild the folder with `text4vpr shards build`")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What makes a manifest unusable (None when its shard list is sound)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        return "not a shard manifest (no 'shards' list)"
    return file_records_problem(manifest["shards"], "shard record")


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


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


def sample_ranges(path: str | os.PathLike) -> list[tuple[str, int, int, str]]:
    """(key, offset, size, sha256) of every sample of a tar file, in order."""
    out: list[list] = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            key = os.path.basename(info.name).partition(".")[0]
            end = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if out and out[-1][0] == key:
                out[-1][2] = end - out[-1][1]
            else:
                out.append([key, info.offset, end - info.offset])
        for rec in out:
            f.seek(rec[1])
            rec.append(hashlib.sha256(f.read(rec[2])).hexdigest())
    return [tuple(r) for r in out]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(shard_dir: str | Path) -> dict:
    """Check every shard's sha256, bytes and sample count against the manifest, and what the
    loader checks besides: each sample's JSON member, the manifest's key list, no key twice."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    problems, owner = [], {}
    for s in manifest["shards"]:
        path = shard_dir / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        if path.stat().st_size != s["bytes"] or file_sha256(path) != s["sha256"]:
            problems.append(f"{s['name']}: checksum mismatch")
            continue
        keys = []
        for key, sample in iter_tar_samples(path):
            keys.append(key)
            if key in owner:
                problems.append(f"{s['name']}: duplicate location key {key} (also in {owner[key]})")
            owner.setdefault(key, s["name"])
            try:
                read_sample_json(sample)  # the loader's own check of each sample
            except ValueError as e:
                problems.append(f"{s['name']}: sample {key}: {e}")
        if len(keys) != s["count"]:
            problems.append(f"{s['name']}: {len(keys)} samples, manifest says {s['count']}")
        elif "keys" in s and keys != list(s["keys"]):
            problems.append(f"{s['name']}: its location keys differ from its manifest entry's list")
        elif "samples" in s and [[o, n, d] for _, o, n, d in sample_ranges(path)] != s["samples"]:
            problems.append(f"{s['name']}: per-sample byte offsets differ from the manifest's")
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
