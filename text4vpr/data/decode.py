"""Raw tar samples -> decoded views and texts -> the batch dict of docs/INTERFACES.md.

Decoding, resizing, ImageNet normalisation (`image_dtype="float32"`; with "uint8" the pixels
are shipped as they are and `text4vpr.data.transforms.normalize_images` runs on the device)
and tokenisation, as run in the loader's workers. Failures go through `Stats.fail`: an error
naming shard and key (`on_error="raise"`) or a counted, logged skip.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch

from text4vpr.data.image_checks import format_problem
from text4vpr.data.loader_config import LoaderConfig, LoaderError
from text4vpr.data.sample_check import read_sample_json
from text4vpr.data.tokenizer import normalize_text
from text4vpr.data.transforms import empty_cpu, normalize_images

log = logging.getLogger("text4vpr.data.loader")


class Stats:
    """Skip counters of one worker (logged; readable directly when num_workers=0)."""

    def __init__(self, on_error: str = "raise"):
        self.on_error = on_error
        self.samples_skipped = 0
        self.shards_truncated = 0
        self.texts_truncated = 0  # descriptions longer than max_text_length tokens (cut, counted)
        self.messages: list[str] = []

    def fail(self, message: str, lost: int = 1, truncated: bool = False) -> None:
        """Raise `LoaderError` (on_error="raise") or count `lost` samples as skipped."""
        if self.on_error == "raise":
            raise LoaderError(message)
        self.record(message, samples=lost, truncated=truncated)

    def record(self, message: str, samples: int = 1, truncated: bool = False) -> None:
        self.samples_skipped += samples
        self.shards_truncated += int(truncated)
        if len(self.messages) < 100:  # the counts stay exact; the endless train stream may repeat a bad shard
            self.messages.append(message)
        log.warning("skipped: %s", message)


class BatchMaker:
    """Decodes samples and collates them into batches for one loader configuration."""

    def __init__(self, cfg: LoaderConfig, stats: Stats, skip_images: frozenset[int] = frozenset(),
                 resize: int | None = None, splits: frozenset[str] | None = None):
        self.cfg, self.stats = cfg, stats
        self.skip_images = frozenset(skip_images)  # location ids whose JPEGs are not decoded (zeros)
        self.resize, self.splits = resize, splits  # what the manifest promises (checked when given)
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            from text4vpr.data.tokenizer import load_tokenizer

            if not self.cfg.tokenizer:
                raise LoaderError("LoaderConfig.tokenizer is not set (a local tokenizer folder)")
            self._tokenizer = load_tokenizer(self.cfg.tokenizer)
        return self._tokenizer

    def decode(self, url: str, key: str, sample: dict) -> dict | None:
        """Raw sample -> (uint8 views [(H,W,3) or None], texts, mask, coords, index); None if skipped."""
        v = self.cfg.views
        try:
            meta = read_sample_json(sample)  # the check `shards inspect` runs too
            if self.splits is not None and meta.get("split") not in self.splits:
                raise ValueError(f"split {meta.get('split')!r}, manifest says {sorted(self.splits)}")
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
                views[pos - 1] = self.decode_image(data)
            return {"views": views, "texts": texts, "mask": mask, "xyz": meta["xyz"], "index": int(meta["index"])}
        except Exception as e:
            self.stats.fail(f"{url}: sample {key}: {type(e).__name__}: {e}")
            return None

    def decode_image(self, data: bytes) -> np.ndarray:
        """JPEG bytes -> (H, W, 3) uint8 at image_size (bilinear; draft mode with fast_decode)."""
        from PIL import Image

        size = self.cfg.image_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is checked here
            im = Image.open(io.BytesIO(data))
        with im:
            self.check_size(im.size)
            problem = format_problem(im)  # a shard of an older build may hold one
            if problem is not None:
                raise ValueError(problem)
            if self.cfg.fast_decode and im.size != (size, size):
                im.draft("RGB", (size, size))  # DCT-domain downscale to >= size (JPEG only)
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb)  # (H, W, 3) uint8

    def check_size(self, wh: tuple[int, int]) -> None:
        """Refuse an image over max_pixels, or not the manifest's --resize size."""
        w, h = wh
        if w * h > self.cfg.max_pixels:
            raise ValueError(f"image of {w}x{h} = {w * h} pixels over the limit of {self.cfg.max_pixels} pixels (max_pixels)")
        if self.resize is not None and wh != (self.resize, self.resize):
            raise ValueError(f"image {w}x{h}, manifest says --resize {self.resize} (a shard of another build?)")

    def collate(self, items: list[dict]) -> dict:
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
        view_mask = torch.tensor([it["mask"] + [False] * (v - len(it["mask"])) for it in items], dtype=torch.bool).view(b, v)
        if self.cfg.image_dtype == "float32":
            images = normalize_images(images, view_mask)  # one pass over the whole batch
        ids, att = self.tokenize([t for it in items for t in it["texts"]], b, v)
        return {
            "images": images,
            "input_ids": ids,
            "attention_mask": att,
            "view_mask": view_mask,
            "coords": torch.tensor([it["xyz"] for it in items], dtype=torch.float64).view(b, 3),  # (B, 3), B may be 0
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        }

    def tokenize(self, texts: list[str | None], b: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise present descriptions; missing views get all-pad ids and mask 0. -> (B, V, L)."""
        present = [i for i, t in enumerate(texts) if t is not None]
        tok = self.tokenizer()
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
