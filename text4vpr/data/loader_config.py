"""Loader settings and the loader's error type (shared by partition, decode and stream)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from text4vpr.data.constants import NUM_VIEWS
from text4vpr.data.image_checks import DEFAULT_MAX_PIXELS
from text4vpr.data.text_settings import DEFAULT_MAX_TEXT_LENGTH, DEFAULT_TEXT_NORMALIZATION
from text4vpr.data.tokenizer import check_text_normalization
from text4vpr.utils.errors import InputError


class LoaderError(InputError, RuntimeError):
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
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH  # recorded in the saved model (data.text_settings)
    dynamic_padding: bool = False  # pad to the longest description in the batch instead of max_text_length
    seed: int = 0
    shuffle_buffer: int = 256  # samples per worker (eval: unused; train: only with fixed_shard_assignment)
    # train: shards per shuffle window of the elastic order (docs/data.md#elastic-order): the shard order
    # is shuffled, then samples within each window of this many shards; larger mixes more, reads less locally
    shuffle_window: int = 8
    on_error: Literal["raise", "skip"] = "raise"
    views: int = NUM_VIEWS
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
    # frozen-trunk cache holds 1/world of them instead of, over the epochs, nearly all.
    # Not elastic: the order then depends on the world size and workers (a resume needs the same)
    fixed_shard_assignment: bool = False
    # check each shard against its manifest when read: sha256 of the whole tar (a replaced,
    # copied or bit-flipped shard), no location key in two shards, every sample of the
    # manifest's splits and (built with --resize) of its image size. False: trusted hot paths
    verify: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # a larger image is a bad sample (raise or skip)
    # "whitespace" or "punkt" (the published nltk sent_tokenize + " ".join; needs the
    # `upstream` extra): see text4vpr.data.tokenizer.normalize_text
    text_normalization: Literal["whitespace", "punkt"] = DEFAULT_TEXT_NORMALIZATION
    # shards at a URL (http(s)://, s3://, gs://): a read is tried 1 + remote_retries times with
    # exponential backoff, within remote_timeout_s in all; a try silent for remote_stall_s is cut
    remote_retries: int = 4
    remote_timeout_s: float = 120.0
    remote_stall_s: float = 20.0
    remote_in_flight: int = 4  # reads running ahead of the decoder, per loader worker
    cache_dir: str | None = None  # local cache of fetched (verified) shard bytes: later epochs read it
    cache_gb: float = 20.0  # the cache's size bound (least recently used evicted)

    def __post_init__(self) -> None:
        # fail at config time: the decoder catches per-sample errors, and under on_error=skip a
        # missing package would otherwise skip every sample
        check_text_normalization(self.text_normalization)
        from text4vpr.config import check_range

        for key, low in (("batch_size", 1), ("image_size", 1), ("num_workers", 0), ("max_text_length", 2),
                         ("shuffle_buffer", 0), ("shuffle_window", 1), ("prefetch_factor", 1), ("max_pixels", 1),
                         ("views", 1)):
            check_range(f"data.loader.{key}", getattr(self, key), low)
        check_range("data.loader.views", self.views, high=4)  # Street360Loc has four views per location
        if self.batches_per_epoch is not None:
            check_range("data.loader.batches_per_epoch", self.batches_per_epoch, 1)
        check_range("data.loader.remote_retries", self.remote_retries, 0)
        check_range("data.loader.remote_in_flight", self.remote_in_flight, 1)
        for key in ("remote_timeout_s", "remote_stall_s", "cache_gb"):
            check_range(f"data.loader.{key}", getattr(self, key), 0, low_open=True)

    def check(self) -> None:
        """Refuse values the loader cannot act on (one line naming the field)."""
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {self.image_dtype!r}")

    def fetcher(self):
        """The remote reader these settings describe (retries, cache, reads in flight)."""
        from text4vpr.data.fetch import Fetcher
        from text4vpr.data.fetch_cache import ByteCache
        from text4vpr.data.remote import RemoteOptions

        opts = RemoteOptions(self.remote_retries, self.remote_timeout_s, self.remote_stall_s)
        cache = ByteCache(self.cache_dir, int(self.cache_gb * 2**30)) if self.cache_dir else None
        return Fetcher(opts, cache, self.remote_in_flight)
