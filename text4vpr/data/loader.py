"""WebDataset loader: shards -> batch dicts, split exactly across ranks and workers.

The loader does its own rank/worker split (do not pass it to Accelerate's `prepare()`):
- train: each (rank, worker) slot streams its own shards (or every S-th sample when there
  are fewer shards than slots), endlessly, through a shuffle buffer seeded by
  (seed, epoch, rank, worker); every rank yields exactly `batches_per_epoch` full batches,
  so uneven shards never hang DDP. `start_batch=n` yields exactly the batches n, n+1, ...
  an uninterrupted epoch would have yielded (same world size and num_workers).
- eval: no shuffle, every location exactly once across all ranks x workers, last batch of
  each worker partial, nothing padded or repeated.
Decoding, resizing, ImageNet normalisation (`image_dtype="float32"`; with "uint8" the
pixels are shipped as they are and `text4vpr.data.transforms.normalize_images` runs on the
device) and tokenisation run in the workers. Errors name the shard and sample key;
`on_error="skip"` counts and logs instead of raising.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from text4vpr.data.shards import MANIFEST, is_shard_dir, iter_tar_samples, load_manifest, shard_descriptions
from text4vpr.data.tokenizer import check_text_normalization, normalize_text
from text4vpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, empty_cpu, normalize_images  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class LoaderError(RuntimeError):
    """A shard or sample could not be read or decoded; the message names shard and key."""


@dataclass
class LoaderConfig:
    """Where the shards are and how batches are made."""

    shards: str = ""  # shard folder (with manifest.json), or brace pattern / '::'-list of paths or URLs
    manifest: str | None = None  # manifest.json for a pattern/URL list (train mode needs counts)
    tokenizer: str = ""  # local Hugging Face tokenizer folder
    batch_size: int = 64  # locations per batch (x views pairs)
    image_size: int = 252
    num_workers: int = 4
    max_text_length: int = 128
    dynamic_padding: bool = False  # pad to the longest description in the batch instead of max_text_length
    seed: int = 0
    shuffle_buffer: int = 256  # samples per worker
    on_error: Literal["raise", "skip"] = "raise"
    views: int = 4
    batches_per_epoch: int | None = None  # train: override locations // (world_size * batch_size)
    pin_memory: bool = False
    prefetch_factor: int = 2
    # "float32": ImageNet-normalised images (the batch contract); "uint8": raw 0-255 pixels,
    # normalise on the device with text4vpr.data.transforms.normalize_images(images, view_mask)
    image_dtype: Literal["float32", "uint8"] = "float32"
    # let the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding (PIL draft mode), then
    # resize the rest of the way: much faster for large source JPEGs, but pixel values differ
    # slightly from full decode + resize (no effect on images already at image_size)
    fast_decode: bool = False
    # train: the same shards go to the same rank (and worker) every epoch, in a new order each
    # epoch; a rank then meets only its 1/world share of the locations, so a per-rank
    # frozen-trunk cache holds 1/world of them instead of, over the epochs, nearly all
    fixed_shard_assignment: bool = False
    # "whitespace" or "punkt" (the published nltk sent_tokenize + " ".join; needs the
    # `upstream` extra): see text4vpr.data.tokenizer.normalize_text
    text_normalization: Literal["whitespace", "punkt"] = "whitespace"

    def __post_init__(self) -> None:
        check_text_normalization(self.text_normalization)


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, from the manifest


def resolve_shards(cfg: LoaderConfig) -> ShardSet:
    """Shard URLs and (when a manifest is available) their sample counts."""
    if cfg.shards and is_shard_dir(cfg.shards):
        manifest = load_manifest(cfg.shards)
        urls = tuple(str(Path(cfg.shards) / s["name"]) for s in manifest["shards"])
        return ShardSet(urls, tuple(s["count"] for s in manifest["shards"]))
    from webdataset.shardlists import expand_urls

    urls = tuple(expand_urls(cfg.shards)) if cfg.shards else ()
    if not urls:
        raise LoaderError(f"no shards found for {cfg.shards!r} (a folder needs {MANIFEST})")
    if cfg.manifest is None:
        return ShardSet(urls, None)
    by_name = {s["name"]: s["count"] for s in json.loads(Path(cfg.manifest).read_text())["shards"]}
    missing = [u for u in urls if os.path.basename(u) not in by_name]
    if missing:
        raise LoaderError(f"{cfg.manifest}: no entry for shard(s) {missing[:3]}")
    return ShardSet(urls, tuple(by_name[os.path.basename(u)] for u in urls))


def dataset_size(cfg: LoaderConfig) -> int:
    """Number of locations in the shards (needs a manifest)."""
    shards = resolve_shards(cfg)
    if shards.counts is None:
        raise LoaderError("sample counts unknown: give a shard folder or LoaderConfig.manifest")
    return sum(shards.counts)


def _default_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: explicit, else torch.distributed's, else (0, 1)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def batches_per_epoch(cfg: LoaderConfig, world_size: int | None = None) -> int:
    """Train-mode batches each rank yields per epoch: locations // (world_size * batch_size)."""
    if cfg.batches_per_epoch is not None:
        return cfg.batches_per_epoch
    _, world = _default_world(0, world_size)
    n = dataset_size(cfg)
    steps = n // (world * cfg.batch_size)
    if steps < 1:
        raise LoaderError(f"{n} locations cannot fill one batch of {cfg.batch_size} on each of {world} ranks")
    return steps


def worker_batch_range(total: int, start: int, num_workers: int, physical: int) -> tuple[int, int, int]:
    """(logical worker, first, end) local batch indices for a DataLoader worker.

    Global batch j comes from logical worker j % W as its local batch j // W. Physical
    worker p plays logical worker (p + start) % W, because the DataLoader always starts its
    round robin at worker 0: so a resumed epoch yields global batches start, start+1, ...
    """
    w = num_workers
    logical = (physical + start) % w
    end = total // w + (1 if logical < total % w else 0)
    first = max(0, -(-(start - logical) // w))  # ceil((start - logical) / W): batches before `start`
    return logical, min(first, end), end


class _Stats:
    """Skip counters of one worker (logged; readable directly when num_workers=0)."""

    def __init__(self):
        self.samples_skipped = 0
        self.shards_truncated = 0
        self.texts_truncated = 0  # descriptions longer than max_text_length tokens (cut, counted)
        self.messages: list[str] = []

    def record(self, message: str, samples: int = 1, truncated: bool = False) -> None:
        self.samples_skipped += samples
        self.shards_truncated += int(truncated)
        if len(self.messages) < 100:  # the counts stay exact; the endless train stream may repeat a bad shard
            self.messages.append(message)
        log.warning("skipped: %s", message)


class ShardStream(IterableDataset):
    """Yields ready batch dicts; one instance per (mode, epoch, rank, start_batch)."""

    def __init__(self, cfg: LoaderConfig, mode: str, epoch: int, rank: int, world_size: int, start_batch: int = 0,
                 skip_images: frozenset[int] = frozenset()):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
        if cfg.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {cfg.image_dtype!r}")
        self.cfg, self.mode, self.epoch = cfg, mode, epoch
        self.rank, self.world = rank, world_size
        self.shards = resolve_shards(cfg)
        self.start_batch = start_batch
        self.total = batches_per_epoch(cfg, world_size) if mode == "train" else None
        if mode == "train" and not 0 <= start_batch <= self.total:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.total}")
        self.skip_images = frozenset(skip_images)  # location ids whose JPEGs are not decoded (zeros)
        self.stats = _Stats()
        self._tokenizer = None

    def __len__(self) -> int:
        """Batches this rank yields (train: exact; eval: exact when the manifest is known)."""
        if self.mode == "train":
            return self.total - self.start_batch
        if self.shards.counts is None:
            raise TypeError("eval length unknown without a manifest")
        w = max(1, self.cfg.num_workers)
        return sum(-(-self._slot_count(self.rank * w + p, self.world * w) // self.cfg.batch_size) for p in range(w))

    # ---- raw samples -------------------------------------------------------------------
    def _read_shard(self, url: str, expected: int | None, report: bool = True) -> Iterator[tuple[str, str, dict]]:
        """(shard, key, {suffix: bytes}) per sample; truncation is an error or a counted skip.
        `report=False`: another slot reads this shard too and counts its loss (skip mode)."""
        from webdataset import gopen

        key, n = None, 0
        try:
            with gopen(url, "rb") as stream:
                for key, sample in iter_tar_samples(stream):
                    yield url, key, sample
                    n += 1
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, gopen errors
            if not report and self.cfg.on_error == "skip":
                return
            self._fail(f"{url}: corrupt or truncated tar after sample {n} (last good key {key}): {type(e).__name__}: {e}",
                       lost=(expected - n) if expected is not None else 1, truncated=True)
            return
        if expected is not None and n != expected and (report or self.cfg.on_error == "raise"):
            self._fail(f"{url}: {n} samples, manifest says {expected} (truncated?)", lost=max(expected - n, 0), truncated=True)

    def _fail(self, message: str, lost: int = 1, truncated: bool = False) -> None:
        if self.cfg.on_error == "raise":
            raise LoaderError(message)
        self.stats.record(message, samples=lost, truncated=truncated)

    def _slot_shards(self, order: list[int], slot: int, slots: int) -> tuple[list[int], bool]:
        """Shards a slot reads, and whether it must take every slots-th sample of them."""
        if len(order) >= slots:
            return order[slot::slots], False
        return order, True

    def _slot_samples(self, order: list[int], slot: int, slots: int) -> Iterator[tuple[str, str, dict]]:
        mine, by_sample = self._slot_shards(order, slot, slots)
        i = 0
        for s in mine:
            counts = self.shards.counts
            owner = not by_sample or s % slots == slot  # with fewer shards than slots, one slot counts a shard's loss
            for item in self._read_shard(self.shards.urls[s], counts[s] if counts else None, owner):
                if not by_sample or i % slots == slot:
                    yield item
                i += 1

    def _slot_count(self, slot: int, slots: int) -> int:
        mine, by_sample = self._slot_shards(list(range(len(self.shards.urls))), slot, slots)
        if not by_sample:
            return sum(self.shards.counts[s] for s in mine)
        total = sum(self.shards.counts)
        return total // slots + (1 if slot < total % slots else 0)

    def _train_samples(self, slot: int, slots: int, logical: int) -> Iterator[tuple[str, str, dict]]:
        """Endless shuffled stream for one slot: new shard order every pass, seeded per epoch."""
        n, cycle = len(self.shards.urls), 0
        buffer_rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, logical, 1])

        while True:  # one pass over the slot's shards per cycle; the buffer empties between passes
            order = self._pass_order(slot, slots, cycle)
            got = 0
            for item in _shuffle(self._slot_samples(order, slot, slots), self.cfg.shuffle_buffer, buffer_rng):
                got += 1
                yield item
            if got == 0:
                raise LoaderError(f"slot {slot} of {slots} got no samples from {n} shards")
            cycle += 1

    def _pass_order(self, slot: int, slots: int, cycle: int) -> list[int]:
        """Shard order of one pass: a new permutation per (epoch, pass); with
        `fixed_shard_assignment`, a fixed shard -> slot map whose slot entries are permuted."""
        n = len(self.shards.urls)
        fresh = np.random.default_rng([self.cfg.seed, self.epoch, cycle, 2]).permutation(n)
        if not self.cfg.fixed_shard_assignment:
            return fresh.tolist()
        fixed = np.random.default_rng([self.cfg.seed, 3]).permutation(n)
        if n < slots:  # slots take every slots-th sample: a fixed reading order keeps that fixed too
            return fixed.tolist()
        mine = fixed[slot::slots]  # this slot's shards, the same every epoch
        fixed[slot::slots] = mine[fresh[fresh < len(mine)]]  # ... read in a new order each pass
        return fixed.tolist()

    # ---- decoding ----------------------------------------------------------------------
    def _tokenizer_obj(self):
        if self._tokenizer is None:
            from text4vpr.data.tokenizer import load_tokenizer

            if not self.cfg.tokenizer:
                raise LoaderError("LoaderConfig.tokenizer is not set (a local tokenizer folder)")
            self._tokenizer = load_tokenizer(self.cfg.tokenizer)
        return self._tokenizer

    def _decode(self, url: str, key: str, sample: dict) -> dict | None:
        """Raw sample -> (uint8 views [(H,W,3) or None], texts, mask, coords, index); None if skipped."""
        from PIL import Image

        v, size = self.cfg.views, self.cfg.image_size
        try:
            meta = json.loads(sample["json"])
            mask = [bool(m) for m in meta["view_mask"]][:v]
            views: list[np.ndarray | None] = [None] * v
            texts: list[str | None] = [None] * v
            decode = int(meta["index"]) not in self.skip_images
            for pos, text in zip(meta["positions"], meta["descriptions"]):
                if pos > v:
                    continue
                texts[pos - 1] = normalize_text(text, self.cfg.text_normalization)
                if not decode:  # the caller holds what it needs of these images (frozen-trunk cache)
                    continue
                data = sample.get(f"{pos}.jpg")
                if data is None:
                    raise KeyError(f"member {pos}.jpg missing")
                with Image.open(io.BytesIO(data)) as im:
                    if self.cfg.fast_decode and im.size != (size, size):
                        im.draft("RGB", (size, size))  # DCT-domain downscale to >= size (JPEG only)
                    im.load()
                    rgb = im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image
                    if rgb.size != (size, size):
                        rgb = rgb.resize((size, size), Image.BILINEAR)
                    views[pos - 1] = np.asarray(rgb)  # (H, W, 3) uint8
            return {"views": views, "texts": texts, "mask": mask, "xyz": meta["xyz"], "index": int(meta["index"])}
        except Exception as e:
            self._fail(f"{url}: sample {key}: {type(e).__name__}: {e}")
            return None

    def _collate(self, items: list[dict]) -> dict:
        """Decoded samples -> the batch dict of docs/INTERFACES.md."""
        b, v, size = len(items), self.cfg.views, self.cfg.image_size
        images = empty_cpu((b, v, 3, size, size), torch.uint8)  # (B, V, 3, H, W), filled view by view
        dst = images.numpy()  # same memory; numpy copies from PIL's read-only arrays without a wrapper
        for i, it in enumerate(items):
            for j, view in enumerate(it["views"]):
                if view is None or j >= len(it["mask"]) or not it["mask"][j]:
                    dst[i, j] = 0  # missing view: 0 (float32 path: exactly 0 after normalising)
                else:
                    dst[i, j] = view.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        view_mask = torch.tensor([it["mask"] + [False] * (v - len(it["mask"])) for it in items], dtype=torch.bool)
        if self.cfg.image_dtype == "float32":
            images = normalize_images(images, view_mask)  # one pass over the whole batch
        ids, att = self._tokenize([t for it in items for t in it["texts"]], b, v)
        return {
            "images": images,
            "input_ids": ids,
            "attention_mask": att,
            "view_mask": view_mask,
            "coords": torch.tensor([it["xyz"] for it in items], dtype=torch.float64),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        }

    def _tokenize(self, texts: list[str | None], b: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise present descriptions; missing views get all-pad ids and mask 0. -> (B, V, L)."""
        present = [i for i, t in enumerate(texts) if t is not None]
        tok = self._tokenizer_obj()
        padding = "longest" if self.cfg.dynamic_padding else "max_length"
        enc = tok([texts[i] for i in present], padding=padding, truncation=True, max_length=self.cfg.max_text_length,
                  return_tensors="np") if present else None
        length = enc["input_ids"].shape[1] if enc is not None else (1 if self.cfg.dynamic_padding else self.cfg.max_text_length)
        ids = np.full((b * v, length), tok.pad_token_id, dtype=np.int64)
        att = np.zeros((b * v, length), dtype=np.int64)
        if enc is not None:
            ids[present], att[present] = enc["input_ids"], enc["attention_mask"]
            cut = sum(1 for e in enc.encodings if e.overflowing) if enc.encodings else 0
            if cut and not self.stats.texts_truncated:
                log.warning("descriptions longer than max_text_length=%d tokens are cut (counted)", self.cfg.max_text_length)
            self.stats.texts_truncated += cut
        return torch.from_numpy(ids).view(b, v, length), torch.from_numpy(att).view(b, v, length)  # (B, V, L)

    def _batches(self, raw: Iterator, limit: int | None) -> Iterator[dict]:
        """Decode raw samples into full batches (train: exactly `limit`); eval keeps the partial tail."""
        items, made = [], 0
        for url, key, sample in raw:
            if limit is not None and made >= limit:
                return
            item = self._decode(url, key, sample)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.cfg.batch_size:
                yield self._collate(items)
                items, made = [], made + 1
        if items and self.mode == "eval":
            yield self._collate(items)

    def _skip(self, raw: Iterator, batches: int) -> None:
        """Fast-forward `batches` batches. Raw samples need no decoding under on_error=raise
        (any bad one would have raised in the original run); under skip they are decoded so
        dropped samples are accounted exactly as in an uninterrupted run."""
        need = batches * self.cfg.batch_size
        while need > 0:
            url, key, sample = next(raw)
            if self.cfg.on_error == "raise" or self._decode(url, key, sample) is not None:
                need -= 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, p = (info.num_workers, info.id) if info is not None else (1, 0)
        try:
            if self.mode == "eval":
                slot, slots = self.rank * w + p, self.world * w
                yield from self._batches(self._slot_samples(list(range(len(self.shards.urls))), slot, slots), None)
            else:
                logical, first, end = worker_batch_range(self.total, self.start_batch, w, p)
                raw = self._train_samples(self.rank * w + logical, self.world * w, logical)
                self._skip(raw, first)
                yield from self._batches(raw, end - first)
        finally:
            if self.stats.samples_skipped:
                log.warning("rank %d worker %d: skipped %d samples (%d truncated shards)", self.rank, p,
                            self.stats.samples_skipped, self.stats.shards_truncated)
            if self.stats.texts_truncated:
                log.warning("rank %d worker %d: %d descriptions cut to max_text_length=%d tokens", self.rank, p,
                            self.stats.texts_truncated, self.cfg.max_text_length)


def _shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffle: fill `size` items, then emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def build_loader(
    cfg: LoaderConfig,
    mode: str = "train",
    *,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    skip_images: frozenset[int] = frozenset(),
) -> DataLoader:
    """A DataLoader of batch dicts for one epoch (train) or one full pass (eval).

    Make a new one each epoch. `len()` is the number of batches this rank yields. Resume
    mid-epoch with `start_batch` (same world size and num_workers as the interrupted run).
    Locations in `skip_images` are not decoded: their images are placeholders (zero pixels;
    under image_dtype="float32" those zeros normalised), their view masks and descriptions
    unchanged. For a trainer whose frozen-trunk cache holds them and never reads the images.
    """
    rank, world_size = _default_world(rank, world_size)
    dataset = ShardStream(cfg, mode, epoch, rank, world_size, start_batch, skip_images)
    if cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=False,
        # own generator: creating the iterator must not consume the global torch RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed + 1_000_003 * epoch),
    )


def all_descriptions(source: str | os.PathLike) -> list[str]:
    """Every description in a shard folder or an xlsx file (e.g. to train a tokenizer)."""
    return shard_descriptions(source)
