"""Where an index or query file came from: the model's weights digest and the shards
manifest digest, recorded when written and compared when used (an index of other weights
with the same config, or of other shards, is refused unless the user takes the risk)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from text4vpr.utils.errors import InputError


class IndexMismatchError(InputError, ValueError):
    """The index was built by other weights or from other shards than those in hand."""


def weights_digest(model) -> str:
    """sha256 over the model's state dict (sorted names, each with dtype, shape and raw bytes):
    the same weights give the same digest however they were loaded or placed."""
    model = getattr(model, "module", model)  # DDP / Accelerate wrapper -> the model
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 included)
    return h.hexdigest()


def shards_digest(shard_dir: str | Path) -> str:
    """sha256 of a shard folder's (or URL prefix's) manifest.json ('' when there is none, e.g. a
    list of tar paths: nothing to compare then, the query-location check remains)."""
    from text4vpr.data.shard_reader import is_shard_dir, manifest_bytes

    return hashlib.sha256(manifest_bytes(shard_dir)).hexdigest() if is_shard_dir(shard_dir) else ""


_WHAT = {
    "weights_digest": ("built by another model: its weights digest {got} differs from this model's {want} (same "
                       "config, other weights)"),
    "shards_digest": ("built from other shards: its shards manifest digest {got} differs from that of the shards "
                      "given ({want})"),
}


def check_digests(header: dict, expected: dict[str, str], where: str = "index", allow_mismatch: bool = False) -> None:
    """Raise IndexMismatchError when a recorded digest differs from `expected` (digests given
    as None are not checked); with `allow_mismatch`, warn instead."""
    for name, want in expected.items():
        got = header.get(name) or ""
        if want is None or got == want:
            continue
        message = (f"{where}: " + _WHAT[name].format(got=(got or "none recorded")[:12], want=(want or "none")[:12])
                   + "; rebuild the index with `text4vpr index build`, or pass --allow-index-mismatch to rank with it "
                   "anyway (the results are then meaningless)")
        if not allow_mismatch:
            raise IndexMismatchError(message)
        warnings.warn(f"index mismatch allowed: {message}", stacklevel=3)


def evaluation_identity(model, model_dir: str | Path, shards: str | Path, index: str | Path | None = None) -> dict:
    """What an evaluation ran on (metrics.json's `identity`): the model folder and its weights
    digest, the shards folder and its manifest digest, the index folder if any, the version."""
    from text4vpr import __version__

    ident = {"model": str(model_dir), "weights_digest": weights_digest(model), "shards": str(shards),
             "shards_digest": shards_digest(shards), "text4vpr": __version__}
    if index:
        ident["index"] = str(index)
    return ident
