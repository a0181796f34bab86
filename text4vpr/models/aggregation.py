"""Sinkhorn cluster aggregation of a feature map into one L2-normalised D*K vector (docs/method.md#sinkhorn-aggregation).

Parameter names (`cluster_features`, `score`, `tau`) follow the upstream module, so its
`1.*` checkpoint keys load by a plain prefix strip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from text4vpr.models.config import AggregationConfig


def _conv_head(c_in: int, hidden: int, c_out: int, dropout: float) -> nn.Sequential:
    """Conv1x1 -> Dropout -> ReLU -> Conv1x1 (indices 0 and 3 hold the weights)."""
    return nn.Sequential(nn.Conv2d(c_in, hidden, 1), nn.Dropout(dropout), nn.ReLU(), nn.Conv2d(hidden, c_out, 1))


def log_sinkhorn(scores: torch.Tensor, iters: int) -> torch.Tensor:
    """log P for scores (B, K, N): both marginals -log N, `iters` rounds, plus log N (docs/method.md)."""
    n = scores.shape[-1]
    log_n = math.log(n)
    u = torch.zeros_like(scores[:, :, :1])  # (B, K, 1)
    v = torch.zeros_like(scores[:, :1, :])  # (B, 1, N)
    for _ in range(iters):
        u = -log_n - torch.logsumexp(scores + v, dim=2, keepdim=True)
        v = -log_n - torch.logsumexp(scores + u, dim=1, keepdim=True)
    return scores + u + v + log_n


class SinkhornAggregation(nn.Module):
    """Feature map (B, C, h, w) -> (B, D*K) with d the slow index, L2-normalised, fp32."""

    def __init__(self, in_channels: int, cfg: AggregationConfig):
        super().__init__()
        self.iters = cfg.sinkhorn_iters
        self.cluster_features = _conv_head(in_channels, cfg.hidden_dim, cfg.cluster_dim, cfg.dropout)
        self.score = _conv_head(in_channels, cfg.hidden_dim, cfg.num_clusters, cfg.dropout)
        # shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast views params as bytes
        self.tau = nn.Parameter(torch.full((1,), float(cfg.tau_init)))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        f = self.cluster_features(fmap).flatten(2)  # (B, D, N)
        s = self.score(fmap).flatten(2)  # (B, K, N)
        with torch.autocast(device_type=fmap.device.type, enabled=False):
            log_p = log_sinkhorn(s.float(), self.iters)  # (B, K, N)
            # tau's gradient sums B*K*N terms that largely cancel: reduce it in float64 (cheap, (B, K, N))
            w = torch.exp(log_p / self.tau.double()).float() + torch.exp(log_p)
            g = torch.einsum("bdn,bkn->bdk", f.float(), w)  # (B, D, K)
            return F.normalize(g.flatten(1), dim=-1)  # (B, D*K), d-major
