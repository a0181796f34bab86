"""Reading built shard folders: manifest, tar samples, checksum verification, lookups."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from text4vpr.data.sample_check import read_sample_json
from text4vpr.data.sample_key import key_index, member_key
from text4vpr.utils.errors import InputError, file_records_problem
from text4vpr.utils.hashing import file_sha256

MANIFEST = "manifest.json"


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


def iter_tar_samples(source, name: str | None = None):
    """Yield (key, {suffix: bytes}) per sample of a tar, in order. `source` is a path or a binary
    stream (read once, front to back; `name` names it in errors); keys follow `member_key`.
    Two members with one key and suffix, or a key split by another, are a ShardError."""
    name = str(source) if name is None and isinstance(source, (str, Path)) else name or "tar stream"
    if isinstance(source, (str, Path)):
        tar = tarfile.open(source, mode="r|*")
    else:
        tar = tarfile.open(fileobj=source, mode="r|*")
    with tar:
        key, sample, seen = None, {}, set()
        for info in tar:
            if not info.isreg():
                continue
            base, suffix = member_key(info.name)
            if base != key:
                if sample:
                    yield key, sample
                    sample = {}
                if base in seen:  # WebDataset would yield two samples with one key
                    raise ShardError(f"{name}: sample {base} appears twice (its members are not adjacent); rebuild the shard")
                seen.add(base)
            key = base
            if suffix in sample:  # WebDataset raises too; keeping one would hide the other
                raise ShardError(f"{name}: sample {base} has two '{suffix}' members; rebuild the shard")
            sample[suffix] = tar.extractfile(info).read()
        if sample:
            yield key, sample


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
    return {"ok": not problems, "problems": problems, "checked": len(manifest["shards"]), "totals": manifest["totals"], "report": manifest["report"]["counts"]}


def find_location(shard_dir: str | Path, index: int) -> list[tuple[str, dict, dict]]:
    """All samples with this index: (shard name, json meta, {pos: jpeg bytes})."""
    shard_dir = Path(shard_dir)
    found = []
    for s in load_manifest(shard_dir)["shards"]:
        for key, sample in iter_tar_samples(shard_dir / s["name"]):
            if key_index(key) == index:
                meta = json.loads(sample["json"])
                images = {int(k.split(".")[0]): v for k, v in sample.items() if k.endswith(".jpg")}
                found.append((s["name"], meta, images))
    return found


def shard_descriptions(shard_dir: str | Path) -> list[str]:
    """All descriptions in a shard folder (e.g. to train a tokenizer)."""
    shard_dir = Path(shard_dir)
    texts = []
    for s in load_manifest(shard_dir)["shards"]:
        for _, sample in iter_tar_samples(shard_dir / s["name"]):
            texts += json.loads(sample["json"])["descriptions"]
    return texts


def shard_paths(shard_dir: str | Path) -> list[str]:
    """Shard file paths of a built folder, in manifest order."""
    shard_dir = Path(shard_dir)
    return [str(shard_dir / s["name"]) for s in load_manifest(shard_dir)["shards"]]
