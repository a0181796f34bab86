"""Chance level of top-k accuracy within r metres: a ranking drawn uniformly at random."""

from __future__ import annotations

import math

import torch

from text4vpr.retrieval.defaults import KS, RADII
from text4vpr.retrieval.metrics import key


def chance_accuracy(
    query_coords: torch.Tensor, db_coords: torch.Tensor, ks=KS, radii=RADII
) -> dict[str, dict[str, float]]:
    """Expected accuracy[k][r] of a random ranking, exact: 1 - C(N-m, k) / C(N, k) per query.

    m = database locations within r of the query. Same key format as the evaluator's metrics
    (k and r as strings, values as fractions).
    """
    q = query_coords.to(torch.float64)
    d = db_coords.to(torch.float64)
    n = d.shape[0]
    dist = torch.cdist(q, d)  # (Q, N)
    within = {r: (dist <= r).sum(dim=1).tolist() for r in radii}  # m per query and radius
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        kk = min(k, n)
        out[key(k)] = {}
        for r, m in within.items():
            miss = [math.comb(n - mi, kk) / math.comb(n, kk) if n - mi >= kk else 0.0 for mi in m]
            out[key(k)][key(r)] = 1.0 - sum(miss) / max(1, len(miss))
    return out
