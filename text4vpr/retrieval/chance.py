"""Chance level of top-k accuracy within r metres: a ranking drawn uniformly at random."""

from __future__ import annotations

import math

import torch


def chance_accuracy(
    query_coords: torch.Tensor, db_coords: torch.Tensor, ks=(1, 5, 10), radii=(5.0, 10.0, 15.0, 30.0)
) -> dict[str, dict[str, float]]:
    """Expected accuracy[k][r] of a random ranking, exact: 1 - C(N-m, k) / C(N, k) per query.

    m = database locations within r of the query. Same key format as the evaluator's metrics
    (k and r as strings, values as fractions).
    """
    q = query_coords.to(torch.float64)
    d = db_coords.to(torch.float64)
    n = d.shape[0]
    dist = torch.cdist(q, d)  # (Q, N)
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        kk = min(k, n)
        out[str(k)] = {}
        for r in radii:
            m = (dist <= r).sum(dim=1).tolist()
            miss = [math.comb(n - mi, kk) / math.comb(n, kk) if n - mi >= kk else 0.0 for mi in m]
            out[str(k)][_rkey(r)] = 1.0 - sum(miss) / max(1, len(miss))
    return out


def _rkey(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else str(r)
