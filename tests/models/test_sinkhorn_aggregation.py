"""Sinkhorn aggregation equals a float64 reference written straight from docs/method.md#sinkhorn-aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from text4vpr.models.aggregation import SinkhornAggregation
from text4vpr.models.config import AggregationConfig


def conv1x1(x, conv):
    """1x1 convolution by hand: x (B, C, N) float64."""
    w = conv.weight.detach().double()[:, :, 0, 0]
    return torch.einsum("oc,bcn->bon", w, x) + conv.bias.detach().double()[None, :, None]


def spec_reference(agg: SinkhornAggregation, fmap: torch.Tensor) -> torch.Tensor:
    """docs/method.md section 'Sinkhorn aggregation', in float64, with explicit loops."""
    x = fmap.double().flatten(2)  # (B, C, N)
    f = conv1x1(torch.relu(conv1x1(x, agg.cluster_features[0])), agg.cluster_features[3])  # (B, D, N)
    s = conv1x1(torch.relu(conv1x1(x, agg.score[0])), agg.score[3])  # (B, K, N)
    bsz, d_dim, n = f.shape
    k_dim = s.shape[1]
    log_a = log_b = -math.log(n)
    out = []
    for b in range(bsz):
        sb = s[b]
        u = torch.zeros(k_dim, dtype=torch.float64)
        v = torch.zeros(n, dtype=torch.float64)
        for _ in range(3):
            u = torch.stack([log_a - torch.logsumexp(sb[k] + v, 0) for k in range(k_dim)])
            v = torch.stack([log_b - torch.logsumexp(sb[:, j] + u, 0) for j in range(n)])
        log_p = sb + u[:, None] + v[None, :] + math.log(n)
        tau = agg.tau.detach().double()
        w = torch.exp(log_p / tau) + torch.exp(log_p)  # (K, N)
        g = torch.zeros(d_dim * k_dim, dtype=torch.float64)
        for d in range(d_dim):
            for k in range(k_dim):
                g[d * k_dim + k] = (f[b, d] * w[k]).sum()
        out.append(g / g.norm())
    return torch.stack(out)


@pytest.mark.parametrize("seed,hw", [(0, (4, 4)), (1, (3, 5))])
def test_matches_float64_spec_reference(seed, hw):
    torch.manual_seed(seed)
    agg = SinkhornAggregation(24, AggregationConfig(num_clusters=5, cluster_dim=6, hidden_dim=16)).eval()
    with torch.no_grad():
        agg.tau.fill_(0.7 + seed * 0.5)
    fmap = torch.randn(3, 24, *hw) * 2
    with torch.no_grad():
        out = agg(fmap)
    ref = spec_reference(agg, fmap)
    assert out.shape == (3, 30) and out.dtype == torch.float32
    assert float((out.double() - ref).norm() / ref.norm()) <= 1e-5


def test_bf16_autocast_keeps_fp32_sinkhorn():
    torch.manual_seed(2)
    agg = SinkhornAggregation(16, AggregationConfig(num_clusters=4, cluster_dim=8, hidden_dim=8))
    fmap = torch.randn(2, 16, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = agg(fmap)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(agg.tau.grad) and torch.isfinite(fmap.grad).all()
