"""Locate a place from up to four descriptions against a loaded index."""

from __future__ import annotations

import numpy as np
import torch

from text4vpr.retrieval.search import sharded_topk_by_location
from text4vpr.utils.errors import InputError

MAX_DESCRIPTIONS = 4


class LocalizeError(InputError, ValueError):
    """The request cannot be answered (no text, too many descriptions, bad vectors)."""


@torch.no_grad()
def encode_descriptions(model, tokenizer, texts: list[str], views: int = 4, max_length: int = 128,
                        text_normalization: str = "whitespace"):
    """(1, V, D) raw text vectors and (1, V) mask; description i fills view i (pos order).

    `text_normalization` as in `normalize_text` ("punkt" for a converted published model)."""
    from text4vpr.data.tokenizer import normalize_text

    texts = [normalize_text(t, text_normalization) for t in texts]
    if not texts or not any(texts):
        raise LocalizeError("no description given: pass at least one non-empty --text")
    if any(not t for t in texts):
        raise LocalizeError("empty description: every --text must hold some words")
    if len(texts) > min(views, MAX_DESCRIPTIONS):
        raise LocalizeError(f"{len(texts)} descriptions given; at most {min(views, MAX_DESCRIPTIONS)} (one per view)")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    ids = torch.full((1, views, max_length), tokenizer.pad_token_id, dtype=torch.int64)
    att = torch.zeros(1, views, max_length, dtype=torch.int64)
    ids[0, : len(texts)], att[0, : len(texts)] = enc["input_ids"], enc["attention_mask"]
    model.eval()
    vectors = model.encode_texts(ids.to(device), att.to(device)).float()  # (1, V, D)
    mask = torch.zeros(1, views, dtype=torch.bool, device=device)
    mask[0, : len(texts)] = True
    if not bool(torch.isfinite(vectors[mask]).all()):
        raise LocalizeError("the model produced non-finite text vectors (NaN or inf); check the checkpoint")
    return vectors, mask


def rank_locations(query: torch.Tensor, query_mask: torch.Tensor, index, top_k: int = 5, mode: str = "upstream",
                   backend: str = "auto") -> list[dict]:
    """Ranked results: rank, score, row, location index, ECEF xyz and WGS84 lat/lon/height (equal
    scores: the lower location index first)."""
    from text4vpr.data.geo import ecef_to_geodetic

    if getattr(index, "approximate", False):  # FAISS candidates, exact re-rank: global rows
        from text4vpr.retrieval.approx_search import approx_topk

        scores, rows = (t[:, : min(top_k, len(index))] for t in approx_topk(index, query, query_mask, top_k, mode))
        rows = rows[0].numpy()
    else:
        db = index.embeddings.to(query.device)
        scores, rows = sharded_topk_by_location(query, query_mask, db, index.view_mask.to(query.device), top_k, mode,
                                                db_ids=index.index, id_offset=index.rows[0], total=db.shape[0],
                                                backend=backend, gather=False)  # the rows this index holds
        rows = rows[0].cpu().numpy()  # global rows (an index may hold a slice of them)
    xyz = index.coords[rows].numpy().astype(np.float64)  # (k, 3)
    llh = ecef_to_geodetic(xyz)  # (k, 3) lat, lon, height
    return [
        {"rank": r + 1, "score": float(scores[0, r]), "row": int(rows[r]), "index": int(index.index[rows[r]]),
         "ecef": [float(v) for v in xyz[r]],
         "lat": float(llh[r, 0]), "lon": float(llh[r, 1]), "height": float(llh[r, 2])}
        for r in range(len(rows))
    ]
