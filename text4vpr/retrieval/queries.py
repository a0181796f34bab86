"""Query vectors of a split (its descriptions), saved for `text4vpr eval-embeddings`.

The file holds `embeddings` (n, V, D) float32, `view_mask` (n, V) bool, `coords` (n, 3)
float64 and `index` (n,) int64 in location-index order (the index part layout), with the
model's config hash, weights digest and shards digest in the metadata. Under several ranks each encodes its share and rank 0
writes the gathered file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from text4vpr.retrieval.evaluate import gather_queries, encode_split
from text4vpr.retrieval.provenance import shards_digest, weights_digest
from text4vpr.utils.atomic import atomic_save_file
from text4vpr.utils.distributed import distributed_world
from text4vpr.utils.errors import InputValueError


QUERIES_FORMAT = "text4vpr-queries"  # told apart from an index part ("text4vpr-index"): never used as a database


def encode_queries(model, loader, out: str | Path, device=None, show_progress: bool = False, shards: str = "") -> dict:
    """Encode every location's descriptions and write them to `out` (.safetensors), with the
    model's weights digest and the `shards` manifest digest (as an index records them, so
    `eval-embeddings` can refuse a pair from two models); return a summary."""
    enc, _ = gather_queries(encode_split(model, loader, device=device, images=False, show_progress=show_progress))
    order = torch.argsort(enc["index"])  # location-index order, whatever the ranks' shares were
    tensors = {"embeddings": enc["queries"][order].contiguous(), "view_mask": enc["query_mask"][order].contiguous(),
               "coords": enc["coords"][order].contiguous(), "index": enc["index"][order].contiguous()}
    if len(tensors["index"]) == 0:
        raise InputValueError("no location was encoded: the shards hold no locations")
    if distributed_world()[0] == 0:
        meta = {"format": QUERIES_FORMAT, "config_hash": model.config_hash(), "weights_digest": weights_digest(model),
                "shards_digest": shards_digest(shards) if shards else ""}
        atomic_save_file(tensors, out, metadata=meta)
    return {"count": len(tensors["index"]), "embed_dim": int(tensors["embeddings"].shape[-1])}
