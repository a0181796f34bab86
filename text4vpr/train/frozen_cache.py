"""Frozen-trunk cache: the frozen DINOv2 blocks' output tokens, computed once per location.

The method has no augmentation (docs/method.md#dinov2-trunk), so the blocks that run without gradient see the same image
every epoch. The first time a location appears its tokens are computed and stored (in the
dtype they were computed in, which keeps training bitwise identical, or in bf16; on the GPU
or in host memory); later steps run only the trained blocks, the aggregation and the text
tower. Per location the cache holds V x (1 + hw) x C values: 4 x 325 x 768 = 1.0 M values,
4.0 MB in fp32 (DINOv2's residual stream stays fp32 under autocast) or 2.0 MB in bf16 for
the paper setup, i.e. 4.0 or 2.0 GB per 1,000 locations. Each rank caches the locations it
meets: with `data.loader.fixed_shard_assignment=true` that is its 1/world share.
"""

from __future__ import annotations

import torch
from text4vpr.utils.errors import InputError


SLAB = 64  # locations per page-locked host block


class FrozenCacheError(InputError, ValueError):
    """The cache would change results (stochastic frozen blocks, nothing frozen)."""


def check_cacheable(model) -> None:
    enc = model.image_encoder
    if enc.num_frozen == 0:
        raise FrozenCacheError("train.frozen_cache: every DINOv2 block is trained (image.trainable_blocks = all); nothing to cache")
    if not enc.frozen_is_deterministic:
        raise FrozenCacheError("train.frozen_cache: the frozen DINOv2 blocks use dropout or drop-path, so their output "
                               "changes every epoch; set them to 0 or turn the cache off")


class FrozenTrunkCache:
    """Location index -> (V, 1 + hw, C) tokens; filled on first sight, reused afterwards."""

    def __init__(self, model, store_device: torch.device | str, dtype: str = "same"):
        check_cacheable(model)
        self.model = model
        self.store_device = torch.device(store_device)
        self.dtype = None if dtype == "same" else getattr(torch, dtype)
        self.store: dict[int, torch.Tensor] = {}
        self._slab: torch.Tensor | None = None  # page-locked block being filled (host store, GPU training)
        self._slab_used = 0
        self.hits = 0
        self.misses = 0

    def tokens(self, batch: dict, index: list[int]) -> torch.Tensor:
        """(B, V, 1 + hw, C) frozen tokens for the batch (`index`: its location ids, from the
        host copy so no device sync), computing only unseen locations."""
        todo = sorted({j for j, i in enumerate(index) if i not in self.store})
        computed: dict[int, torch.Tensor] = {}
        if todo:
            rows = torch.tensor(todo, device=batch["images"].device)
            fresh = self.model.frozen_image_tokens(batch["images"][rows], batch["view_mask"][rows])  # (b, V, T, C)
            for j, t in zip(todo, fresh):
                if index[j] not in self.store:
                    self.store[index[j]] = self._keep(t)
                if self.dtype is None:  # stored exactly as computed: use it as is, no round trip
                    computed[j] = t
        self.misses += len(todo)
        self.hits += len(index) - len(todo)
        rows = [computed[j] if j in computed else self.store[i] for j, i in enumerate(index)]
        return gather_rows(rows, batch["view_mask"].device)  # (B, V, T, C)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """A location's tokens as stored: in host memory they are page-locked when a GPU trains,
        so that later steps copy them straight to the device, asynchronously. The copy into
        host memory is synchronous (first sight only), so the host copy is valid on return,
        whatever stream later reads it."""
        dtype = self.dtype or t.dtype
        if self.store_device.type == "cpu" and t.device.type == "cuda":
            return self._pinned_slot(t.shape, dtype).copy_(t)
        return t.to(self.store_device, dtype)

    def _pinned_slot(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """One location's place in a page-locked block of SLAB locations. One allocation per
        block: torch rounds each pinned allocation up to a power of two (5-33 % lost per
        location at the paper's token shapes if each had its own)."""
        slab = self._slab
        if slab is None or self._slab_used == slab.shape[0] or slab.shape[1:] != shape or slab.dtype != dtype:
            self._slab = slab = torch.empty((SLAB, *shape), dtype=dtype, pin_memory=True)  # (SLAB, V, T, C)
            self._slab_used = 0
        self._slab_used += 1
        return slab[self._slab_used - 1]

    def locations(self) -> frozenset[int]:
        """The cached location ids: the loader need not decode their images."""
        return frozenset(self.store)

    def covers(self, index: list[int]) -> bool:
        """True when every location of a batch is cached (its images are not needed at all)."""
        return all(i in self.store for i in index)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def stats(self) -> dict:
        return {"locations": len(self.store), "hits": self.hits, "misses": self.misses, "bytes": self.nbytes}


def gather_rows(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack equally shaped tensors onto `device`: `torch.stack` when they all live there, else
    one non-blocking copy per row into the output (no staging copy on the host)."""
    if all(r.device == torch.device(device) for r in rows):
        return torch.stack(rows)
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, device=device)
    for dst, src in zip(out, rows):
        dst.copy_(src, non_blocking=True)
    return out
