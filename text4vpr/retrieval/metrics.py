"""Top-k accuracy within r metres, exactly as docs/method.md#accuracy-within-r-metres (and upstream's test.py) define it.

A query counts as correct at (k, r) when any of its k best-ranked database locations lies
within r metres (distance <= r, Euclidean in ECEF) of the query's true position. The
result is `accuracy[str(k)][str(r)]` as a fraction of all queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from text4vpr.retrieval.defaults import KS, RADII
from text4vpr.utils.errors import InputValueError


def key(x: float) -> str:
    """JSON key for k or r: '5' for 5 or 5.0, '7.5' for 7.5."""
    return str(int(x)) if float(x).is_integer() else str(float(x))


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def topk_within_radius(
    topk_ids,
    query_coords,
    db_coords,
    ks: Sequence[int] = KS,
    radii: Sequence[float] = RADII,
) -> dict[str, dict[str, float]]:
    """accuracy[k][r] from ranked ids (Q, K) into the database rows, coords (Q, 3) / (N, 3) metres.

    K must be at least max(ks) unless the database is smaller (then all of it is ranked).
    Distances are float64.
    """
    ids = _numpy(topk_ids).astype(np.int64)
    q_xyz = _numpy(query_coords).astype(np.float64)
    db_xyz = _numpy(db_coords).astype(np.float64)
    if ids.ndim != 2 or ids.shape[0] != q_xyz.shape[0]:
        raise ValueError(f"topk_ids must be (Q, K) with Q = {q_xyz.shape[0]} queries, got {ids.shape}")
    if ids.shape[0] == 0:
        raise InputValueError("no queries to evaluate")
    if not ks or not radii or min(ks) < 1:
        raise InputValueError(f"ks must be positive ints and radii non-empty, got ks={ks}, radii={radii}")
    if ids.shape[1] < min(max(ks), db_xyz.shape[0]):
        raise InputValueError(f"{ids.shape[1]} ranked ids per query, but k up to {max(ks)} requested")
    dist = np.linalg.norm(db_xyz[ids] - q_xyz[:, None, :], axis=-1)  # (Q, K)
    accuracy: dict[str, dict[str, float]] = {}
    for k in ks:
        nearest = dist[:, :k].min(axis=1)  # (Q,) closest of the top k
        accuracy[key(k)] = {key(r): float(np.mean(nearest <= r)) for r in radii}
    return accuracy
