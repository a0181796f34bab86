"""Query vectors of a split (its descriptions), saved for `text4vpr eval-embeddings`.

The file holds `embeddings` (n, V, D) float32, `view_mask` (n, V) bool, `coords` (n, 3)
float64 and `index` (n,) int64 in location-index order (the index part layout), with the
model's config hash in the metadata. Under several ranks each encodes its share and rank 0
writes the gathered file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from text4vpr.retrieval.evaluate import encode_split
from text4vpr.utils.atomic import atomic_save_file
from text4vpr.utils.distributed import distributed_world


def _gather(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's rows, concatenated (a no-op in one process)."""
    _, world = distributed_world()
    if world == 1:
        return local
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in local}


def encode_queries(model, loader, out: str | Path, device=None, show_progress: bool = False) -> dict:
    """Encode every location's descriptions and write them to `out` (.safetensors); return a summary."""
    enc = _gather(encode_split(model, loader, device=device, images=False, show_progress=show_progress))
    order = torch.argsort(enc["index"])  # location-index order, whatever the ranks' shares were
    tensors = {"embeddings": enc["queries"][order].contiguous(), "view_mask": enc["query_mask"][order].contiguous(),
               "coords": enc["coords"][order].contiguous(), "index": enc["index"][order].contiguous()}
    if len(tensors["index"]) == 0:
        raise ValueError("no location was encoded: the shards hold no locations")
    if distributed_world()[0] == 0:
        atomic_save_file(tensors, out, metadata={"config_hash": model.config_hash()})
    return {"count": len(tensors["index"]), "embed_dim": int(tensors["embeddings"].shape[-1])}
