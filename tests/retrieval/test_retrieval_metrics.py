"""The metric against a plain float64, loop-per-query re-implementation of docs/method.md#accuracy-within-r-metres."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text4vpr.kernels.topk import group_topk
from text4vpr.retrieval.metrics import key, topk_within_radius


def spec_accuracy(text, images, coords, ks, radii):
    """docs/method.md, literally: per query, dot with every database group, rank, distances, any within r."""
    text, images, coords = text.astype(np.float64), images.astype(np.float64), coords.astype(np.float64)
    hits = {k: {r: 0 for r in radii} for k in ks}
    ids = np.arange(len(images))
    for q in range(len(text)):
        sims = images @ text[q]
        order = np.lexsort((ids, -sims))
        dists = np.linalg.norm(coords[order] - coords[q], axis=1)
        for k in ks:
            for r in radii:
                hits[k][r] += bool(np.any(dists[:k] <= r))
    return {key(k): {key(r): hits[k][r] / len(text) for r in radii} for k in ks}


def clustered_coords(rng, n):
    """ECEF-like positions on a street: gaps of 1-15 m, so many neighbours are under 5 m apart."""
    steps = rng.uniform(1.0, 15.0, size=(n, 1)) * rng.normal(size=(n, 3))
    return np.array([4.0e6, 6.0e5, 4.9e6]) + np.cumsum(steps, axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_equals_spec_loop(seed):
    rng = np.random.default_rng(seed)
    n, v, d = 120, 4, 16
    coords = clustered_coords(rng, n)
    images = rng.normal(size=(n, v, d))
    text = images + rng.normal(scale=2.0, size=(n, v, d))  # partly informative queries
    ks, radii = (1, 5, 10), (5, 10, 15, 30)
    _, ids = group_topk(torch.tensor(text, dtype=torch.float32), None, torch.tensor(images, dtype=torch.float32), None, 10)
    got = topk_within_radius(ids, coords, coords, ks, radii)
    want = spec_accuracy(text.reshape(n, -1), images.reshape(n, -1), coords, ks, radii)
    assert got == want
    pair_gaps = np.linalg.norm(np.diff(coords, axis=0), axis=1)
    assert (pair_gaps < 5).any()  # the case docs/method.md#dataset warns about is exercised
    assert 0 < got["1"]["30"] < 1


def test_boundary_is_inclusive_and_keys_are_strings():
    coords = np.array([[0.0, 0, 0], [5.0, 0, 0], [100.0, 0, 0]])
    ids = np.array([[1, 2], [2, 0], [0, 1]])  # query 0's best is exactly 5 m away
    acc = topk_within_radius(ids, coords, coords, ks=(1, 2), radii=(5, 7.5))
    assert acc == {"1": {"5": 1 / 3, "7.5": 1 / 3}, "2": {"5": 2 / 3, "7.5": 2 / 3}}


def test_errors():
    coords = np.zeros((2, 3))
    with pytest.raises(ValueError, match="no queries"):
        topk_within_radius(np.zeros((0, 1), int), coords[:0], coords)
    with pytest.raises(ValueError, match="ranked ids"):
        topk_within_radius(np.zeros((2, 1), int), coords, np.zeros((20, 3)), ks=(1, 5))
