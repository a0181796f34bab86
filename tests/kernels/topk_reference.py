"""Plain float64 references for the group-similarity modes and the tie rule (test helper)."""

from __future__ import annotations

import numpy as np
import torch


def reference_scores(queries, query_mask, database, db_mask, mode: str) -> np.ndarray:
    """(Q, N) float64 scores, written straight from the mode definitions."""
    q = queries.double().numpy()
    d = database.double().numpy()
    qm = np.ones(q.shape[:2], bool) if query_mask is None else query_mask.numpy().astype(bool)
    dm = np.ones(d.shape[:2], bool) if db_mask is None else db_mask.numpy().astype(bool)
    num_v = q.shape[1]

    def dots(rot: int, normalise: bool):
        total = np.zeros((q.shape[0], d.shape[0]))
        count = np.zeros_like(total)
        for v in range(num_v):
            u = (v + rot) % num_v
            a, b = q[:, v], d[:, u]
            if normalise:
                na = np.linalg.norm(a, axis=1, keepdims=True)
                nb = np.linalg.norm(b, axis=1, keepdims=True)
                a = np.where(na > 0, a / np.where(na > 0, na, 1), 0)
                b = np.where(nb > 0, b / np.where(nb > 0, nb, 1), 0)
            both = qm[:, v][:, None] & dm[:, u][None, :]
            total += np.where(both, a @ b.T, 0.0)
            count += both
        return total, count

    if mode == "upstream":
        return dots(0, False)[0]
    if mode == "cosine":
        total, count = dots(0, True)
        return total / np.maximum(count, 1)
    if mode == "any-heading":
        return np.max([dots(r, False)[0] for r in range(num_v)], axis=0)
    raise ValueError(mode)


def reference_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: higher score first, then lower id; (Q, min(k, N)) scores and ids."""
    ids = np.arange(scores.shape[1])
    out_ids = np.stack([np.lexsort((ids, -row))[:k] for row in scores]) if len(scores) else np.zeros((0, k), int)
    return np.take_along_axis(scores, out_ids, 1) if len(scores) else scores[:, :k], out_ids


def random_case(seed: int, num_q: int, n: int, v: int, d: int, partial: bool, ties: bool = False):
    """Random queries/database/masks; `ties` gives exact scores with many ties."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # unit views with four entries of +-0.5: every score exact in fp32, many equal
        queries, database = torch.zeros(num_q, v, d), torch.zeros(n, v, d)
        queries[..., :4] = torch.randint(0, 2, (num_q, v, 4), generator=g) - 0.5
        database[..., :4] = torch.randint(0, 2, (n, v, 4), generator=g) - 0.5
        database[n // 2 :] = database[: n - n // 2].clone()  # duplicated rows: equal scores, distinct ids
    else:
        queries = torch.randn(num_q, v, d, generator=g)
        database = torch.randn(n, v, d, generator=g)
    qm = dm = None
    if partial:
        qm = torch.rand(num_q, v, generator=g) < 0.6
        qm[:, 0] = qm[:, 0] | ~qm.any(1)  # at least one description per query
        dm = torch.rand(n, v, generator=g) < 0.8
        database = database * dm[..., None]  # missing views are zeros, as the model writes them
    return queries, qm, database, dm
