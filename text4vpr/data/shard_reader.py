"""Reading built shard folders: manifest, tar samples, checksum verification, lookups.

A folder is a local path or a URL prefix (`remote.is_url`) holding `manifest.json` and the tars."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from text4vpr.data.remote import is_url, join_url, read_all, read_range
from text4vpr.data.sample_check import read_sample_json
from text4vpr.data.sample_key import key_index, member_key
from text4vpr.utils.errors import InputError, file_records_problem
from text4vpr.utils.hashing import bytes_sha256, file_sha256

MANIFEST = "manifest.json"
BLOCK = 512  # tar block: every header, and every member's data padded to a multiple of it


class ShardError(InputError, RuntimeError):
    """A shard directory is inconsistent (checksum, count, or a different earlier build)."""


def load_manifest(shard_dir: str | Path) -> dict:
    """The folder's manifest, checked: readable JSON whose shard records name plain files inside
    the folder (a crafted name never becomes a path elsewhere) and count their samples."""
    path = member(shard_dir, MANIFEST)
    raw = manifest_bytes(shard_dir)
    if raw is None:
        raise ShardError(f"{path}: no manifest (was `text4vpr shards build` run to completion?)")
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: str) -> dict:
    """A manifest's bytes (read from `path`) as a checked dict; ShardError naming `path` otherwise."""
    try:
        manifest = json.loads(raw)
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


def manifest_bytes(shard_dir: str | Path) -> bytes | None:
    """The raw manifest.json of a folder or URL prefix (None when a local folder has none)."""
    if is_url(shard_dir):
        return read_all(join_url(str(shard_dir), MANIFEST))
    path = Path(shard_dir) / MANIFEST
    return path.read_bytes() if path.is_file() else None


def member(shard_dir: str | Path, name: str) -> str:
    """Path or URL of the file `name` (a checked plain name) of a shard folder."""
    return join_url(str(shard_dir), name) if is_url(shard_dir) else str(Path(shard_dir) / name)


def is_shard_dir(path: str | os.PathLike) -> bool:
    """A local folder with a manifest, or a URL prefix (not a .tar, brace pattern or '::' list)."""
    if is_url(path):
        return not str(path).endswith(".tar") and "{" not in str(path) and "::" not in str(path)
    return (Path(path) / MANIFEST).is_file()


def open_shard(shard_dir: str | Path, record: dict):
    """A shard of a folder: its local path, or its bytes (one ranged read) when at a URL."""
    if is_url(shard_dir):
        return io.BytesIO(read_range(member(shard_dir, record["name"]), 0, record["bytes"]))
    return Path(shard_dir) / record["name"]


def iter_shard_samples(shard_dir: str | Path):
    """(shard name, key, {suffix: bytes}) of every sample of a folder, in manifest order."""
    for s in load_manifest(shard_dir)["shards"]:
        for key, sample in iter_tar_samples(open_shard(shard_dir, s)):
            yield s["name"], key, sample


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


def sample_ranges(path: str | os.PathLike) -> list[tuple[str, int, int, str]]:
    """(key, offset, size, sha256) of every sample of a tar file, in order."""
    out: list[list] = []
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    key = member_key(info.name)[0]
                    end = info.offset_data + -(-info.size // BLOCK) * BLOCK
                    if out and out[-1][0] == key:
                        out[-1][2] = end - out[-1][1]
                    else:
                        out.append([key, info.offset, end - info.offset])
        except tarfile.TarError as e:
            raise ShardError(f"{path}: not a readable tar ({e}); rebuild the folder") from None
        for rec in out:
            f.seek(rec[1])
            rec.append(bytes_sha256(f.read(rec[2])))
    return [tuple(r) for r in out]


def _local_ranges(shard_dir, name: str) -> list | None:
    """The per-sample byte ranges of a shard in a local folder (None for a folder at a URL)."""
    path = Path(str(shard_dir)) / name
    return [[o, n, d] for _, o, n, d in sample_ranges(path)] if path.is_file() else None


def verify_shards(shard_dir: str | Path) -> dict:
    """Check every shard's sha256, bytes and sample count against the manifest, and what the
    loader checks besides: each sample's JSON member, the manifest's key list, no key twice."""
    manifest = load_manifest(shard_dir)
    problems, owner = [], {}
    for s in manifest["shards"]:
        problem, source = _shard_problem(shard_dir, s)
        if problem:
            problems.append(f"{s['name']}: {problem}")
            continue
        keys = []
        try:
            for key, sample in iter_tar_samples(source):
                keys.append(key)
                if key in owner:
                    problems.append(f"{s['name']}: duplicate location key {key} (also in {owner[key]})")
                owner.setdefault(key, s["name"])
                try:
                    read_sample_json(sample)  # the loader's own check of each sample
                except ValueError as e:
                    problems.append(f"{s['name']}: sample {key}: {e}")
        except tarfile.TarError as e:  # bytes that match the manifest's digest, yet no tar
            problems.append(f"{s['name']}: not a readable tar ({e})")
            continue
        if len(keys) != s["count"]:
            problems.append(f"{s['name']}: {len(keys)} samples, manifest says {s['count']}")
        elif "keys" in s and keys != list(s["keys"]):
            problems.append(f"{s['name']}: its location keys differ from its manifest entry's list")
        elif "samples" in s and _local_ranges(shard_dir, s["name"]) not in (None, s["samples"]):
            problems.append(f"{s['name']}: per-sample byte offsets differ from the manifest's")
    return {"ok": not problems, "problems": problems, "checked": len(manifest["shards"]), "totals": _totals(manifest),
            "report": manifest["report"].get("counts") if isinstance(manifest.get("report"), dict) else None}


def _totals(manifest: dict) -> dict:
    """The manifest's totals; counted from its shard records when it has none (a hand-edited one)."""
    if isinstance(manifest.get("totals"), dict):
        return manifest["totals"]
    records = manifest["shards"]
    return {"shards": len(records), "locations": sum(r["count"] for r in records), "views": "?",
            "bytes": sum(r.get("bytes", 0) for r in records if isinstance(r.get("bytes", 0), int))}


def _shard_problem(shard_dir: str | Path, record: dict):
    """(what is wrong with a shard's bytes or None, its path or bytes stream)."""
    if is_url(shard_dir):
        from text4vpr.data.remote import RemoteReadError

        try:
            data = read_range(member(shard_dir, record["name"]), 0, record["bytes"])
        except RemoteReadError as e:
            return f"unreadable ({e})", None
        return (None if bytes_sha256(data) == record["sha256"] else "checksum mismatch"), io.BytesIO(data)
    path = Path(shard_dir) / record["name"]
    if not path.exists():
        return "missing", None
    if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
        return "checksum mismatch", None
    return None, path


def find_location(shard_dir: str | Path, index: int) -> list[tuple[str, dict, dict]]:
    """All samples with this index: (shard name, json meta, {pos: jpeg bytes})."""
    found = []
    for name, key, sample in iter_shard_samples(shard_dir):
        if key_index(key) == index:
            meta = json.loads(sample["json"])
            images = {int(k.split(".")[0]): v for k, v in sample.items() if k.endswith(".jpg")}
            found.append((name, meta, images))
    return found


def shard_descriptions(source: str | Path) -> list[str]:
    """All descriptions in a shard folder (e.g. to train a tokenizer)."""
    texts = []
    for _, _, sample in iter_shard_samples(source):
        texts += json.loads(sample["json"])["descriptions"]
    return texts
