"""The run's data: the synthetic demo set (generated and cached once) or given shard folders,
and the per-epoch train / eval loaders for this rank."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from text4vpr.data.loader import LoaderConfig, batches_per_epoch, build_loader
from text4vpr.data.sample_key import key_index
from text4vpr.data.sample_index import index_offsets
from text4vpr.data.shard_reader import iter_shard_samples, load_manifest, shard_descriptions
from text4vpr.data.shards import BuildOptions, build_shards
from text4vpr.data.synthetic import SynthConfig, write_synthetic
from text4vpr.data.tokenizer import train_tokenizer
from text4vpr.utils.atomic import atomic_write_json
from text4vpr.config import ConfigError
from text4vpr.utils.distributed import raise_together
from text4vpr.utils.errors import InputError, InputValueError, say

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataPaths:
    train: str
    val: str
    test: str
    tokenizer: str


def synthetic_root(cfg) -> Path:
    s = cfg.synthetic
    return Path(s.cache_dir) / f"synth-n{s.locations}-px{s.image_size}-seed{s.seed}-shard{s.shard_size}"


def ensure_synthetic(root: Path, s, vocab_size: int = 1000) -> None:
    """Generate the synthetic Street360Loc, its shards and a tokenizer, once (READY marks done)."""
    if (root / "READY.json").exists():
        for split in SPLITS:  # a cache made before manifests recorded sample offsets: add them (tars unchanged)
            if not all("samples" in e for e in load_manifest(root / "shards" / split)["shards"]):
                index_offsets(root / "shards" / split)
        return
    raw = root / "raw"
    print(f"preparing synthetic Street360Loc ({s.locations} locations) in {root} (cached for later runs)")
    write_synthetic(raw, SynthConfig(locations=s.locations, seed=s.seed, image_size=s.image_size), progress=True)
    for split in SPLITS:
        build_shards(raw / f"{split}_description.xlsx", raw / "Street360Loc_images", root / "shards" / split,
                     BuildOptions(max_count=s.shard_size), progress=False)
    train_tokenizer(shard_descriptions(root / "shards" / "train"), root / "tokenizer", vocab_size=vocab_size)
    atomic_write_json(root / "READY.json", dataclasses.asdict(s))


def prepare_data(cfg, acc) -> DataPaths:
    """Resolve the split folders and tokenizer; the main process generates the demo data."""
    if cfg.synthetic.locations > 0:
        root = synthetic_root(cfg)
        if acc.is_main_process:
            ensure_synthetic(root, cfg.synthetic)
        acc.wait_for_everyone()
        shards = root / "shards"
        return DataPaths(train=str(shards / "train"), val=str(shards / "val"), test=str(shards / "test"),
                         tokenizer=cfg.loader.tokenizer or str(root / "tokenizer"))
    if not cfg.train_shards or not cfg.val_shards:
        raise ConfigError("data.train_shards and data.val_shards are required (or data.synthetic.locations > 0)")
    if not cfg.loader.tokenizer:
        raise ConfigError("data.loader.tokenizer: give the local tokenizer folder (e.g. your T5 folder)")
    return DataPaths(train=cfg.train_shards, val=cfg.val_shards, test=cfg.test_shards or cfg.val_shards,
                     tokenizer=cfg.loader.tokenizer)


def link_run_shards(paths: DataPaths, run_dir: Path) -> None:
    """`run_dir/shards/{train,val,test}`: relative links to the cached synthetic shards, so that
    the README's commands after the demo (eval, index, localize) name them under the run folder."""
    for split in SPLITS:
        link, target = run_dir / "shards" / split, Path(getattr(paths, split)).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue  # a resumed run: already there
        if link.is_symlink():
            link.unlink()  # a link to an earlier cache location
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.relpath(target, link.parent.resolve()), target_is_directory=True)
        except OSError as e:  # a filesystem without links: say where the shards are instead
            print(f"note: could not link {link} to the demo's shards ({e}); they are in {target.parent}")
            return


class SplitOverlapError(InputError, ValueError):
    """The val or test shards hold locations of the train shards."""


def location_ids(shards: str | Path) -> set[int]:
    """The location indices of a shard folder: from the manifest's per-shard keys
    (`{split}-{index:06d}`, written by builds since the keys were listed; the loader checks
    them against the verified shards), else from the samples' JSON members (reads every shard)."""
    entries = load_manifest(shards)["shards"]
    if all("keys" in e for e in entries):
        return {key_index(k) for e in entries for k in e["keys"]}
    return {int(json.loads(sample["json"])["index"]) for _, _, sample in iter_shard_samples(shards)}


def check_split_overlap(paths: DataPaths, allow: bool = False) -> None:
    """Raise SplitOverlapError when the val or test shards share location indices with the
    train shards (validation and the best-model choice would run on training data)."""
    if allow:
        return
    train = location_ids(paths.train)
    for key, folder in (("val_shards", paths.val), ("test_shards", paths.test)):
        if key == "test_shards" and folder == paths.val:
            continue  # test = val (no test_shards given): checked already
        ids = train if folder == paths.train else location_ids(folder)
        shared = sorted(train & ids)
        if shared:
            raise SplitOverlapError(
                f"data.{key} {folder}: {len(shared)} of its {len(ids)} locations are also among the "
                f"{len(train)} train locations of {paths.train} (e.g. {', '.join(map(str, shared[:5]))}); "
                "rebuild that split without them (its numbers would be measured on training data), or set "
                "data.allow_split_overlap=true"
            )


def check_split_overlap_once(paths: DataPaths, allow: bool, acc) -> None:
    """`check_split_overlap` on the main process (it reads the manifests, or every shard);
    every rank raises the same error, whatever it is (an unreadable val folder too), so no
    rank waits for one that has died."""
    from accelerate.utils import broadcast_object_list

    message: list = [None]
    if acc.is_main_process:
        try:
            check_split_overlap(paths, allow)
        except Exception as e:  # noqa: BLE001 - passed on to every rank, then raised on each
            message[0] = (isinstance(e, SplitOverlapError), str(e))
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        broadcast_object_list(message)
    if message[0] is not None:
        overlap, text = message[0]
        raise SplitOverlapError(text) if overlap else SplitCheckError(text)


class SplitCheckError(InputError, RuntimeError):
    """The split-overlap check could not read a split's shards (message from the main process)."""


def _loader_cfg(cfg: LoaderConfig, shards: str, tokenizer: str) -> LoaderConfig:
    """The run's loader settings for one split: only the two fields the run resolves itself."""
    if cfg.shards or cfg.tokenizer not in ("", tokenizer):  # refused by DataConfig; a user value is never dropped
        raise ValueError(f"loader settings would be replaced: shards={cfg.shards!r}, tokenizer={cfg.tokenizer!r}")
    return dataclasses.replace(cfg, shards=shards, tokenizer=tokenizer)


def train_loader(paths: DataPaths, cfg: LoaderConfig, acc, epoch: int, start_batch: int,
                 skip_images: frozenset[int] = frozenset()):
    """This rank's batches of `epoch`, from batch `start_batch` on (exact mid-epoch resume), the
    ranks agreeing at each step on read errors and skips (`agreed_batches`); the locations in
    `skip_images` (already in the frozen-trunk cache) are not decoded."""
    loader = build_loader(_loader_cfg(cfg, paths.train, paths.tokenizer), "train", epoch=epoch,
                          start_batch=start_batch, rank=acc.process_index, world_size=acc.num_processes,
                          skip_images=skip_images)
    return agreed_batches(loader, f"rank {acc.process_index}: epoch {epoch}")


def agreed_batches(loader, label: str) -> Iterator[dict | None]:
    """The loader's batches, the ranks agreeing at every step (one small all-reduce): a rank
    whose read failed makes every rank raise its one-line message (none is left waiting in a
    collective), and every rank prints the samples skipped so far on all ranks after `label`.
    A global batch of which some rank holds no sample (its whole share skipped) is dropped on
    every rank: yielded as None, its other samples counted as skipped too."""
    batches, total, dropped = iter(loader), 0, 0
    while True:
        batch, error, ended = None, None, False
        try:
            batch = next(batches)
        except StopIteration:
            ended = True  # train loaders yield the same number of batches on every rank: all end here
        except InputError as e:
            error = e
        skipped, empty, kept = raise_together(error, _batch_counts(batch))
        if empty:  # the model cannot take an empty batch, and one rank cannot sit out a step's collectives
            skipped, dropped, batch = skipped + kept, dropped + 1, None
        if skipped:
            total += skipped
            whole = f"; {dropped} global batches dropped whole, a rank had none of its share" if dropped else ""
            say(f"{label}: {total} samples skipped so far on all ranks (data.loader.on_error=skip; the warnings "
                f"name the shards{whole})", sys.stdout)
        if ended:
            return
        yield batch


def _batch_counts(batch: dict | None) -> list[int]:
    """[samples skipped, 1 if the batch is empty, samples in it]: what the ranks sum at each step."""
    if batch is None:
        return [0, 0, 0]
    n = int(batch["index"].shape[0])
    return [int(batch.pop("skipped", 0)), int(n == 0), n]


def steps_per_epoch(paths: DataPaths, cfg: LoaderConfig, world_size: int) -> int:
    n = batches_per_epoch(_loader_cfg(cfg, paths.train, paths.tokenizer), world_size)
    if n < 1:
        raise InputValueError(f"{paths.train}: too few locations for one batch of {cfg.batch_size} per rank × {world_size} ranks")
    return n


def eval_loader(shards: str, cfg: LoaderConfig, tokenizer: str, acc):
    """Every location of `shards` exactly once across ranks and workers."""
    return build_loader(_loader_cfg(cfg, shards, tokenizer), "eval", rank=acc.process_index, world_size=acc.num_processes)


def read_coords(shards: str) -> torch.Tensor:
    """(N, 3) float64 ECEF of every location in a shard folder (or URL prefix), from the JSON members only."""
    xyz = [json.loads(sample["json"])["xyz"] for _, _, sample in iter_shard_samples(shards)]
    return torch.tensor(xyz, dtype=torch.float64)
