"""BatchNorm1d whose batch statistics span every rank, on any device (gloo CPU included).

torch's SyncBatchNorm refuses CPU tensors. With per-rank statistics a DDP run is not the
same computation as one process on the global batch; with these it is. Statistics are
all-reduced with autograd, so gradients flow through the mean and variance as they do in a
single process.
"""

from __future__ import annotations

import torch
from torch import nn

from text4vpr.utils.distributed import all_reduce_sum, distributed_world


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """Drop-in BatchNorm1d for (N, C) inputs; identical to it when not distributed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed_world()[1] > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) input, got {tuple(x.shape)}")
        xf = x.float()
        # two passes, as BatchNorm does: mean first, then the centred sum of squares (a
        # single E[x^2] - E[x]^2 pass loses precision when |mean| >> std)
        stats = all_reduce_sum(torch.cat([xf.new_tensor([float(x.shape[0])]), xf.sum(0)]))
        n = stats[0].detach()
        mean = stats[1:] / n
        var = all_reduce_sum(((xf - mean) ** 2).sum(0)) / n  # biased, used to normalise
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var.detach() * n / max(float(n) - 1.0, 1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in `module` by GlobalBatchNorm1d, keeping parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.parameters(), child.running_mean).device)
            new.train(child.training)
            new.requires_grad_(any(p.requires_grad for p in child.parameters()) if child.affine else False)
            setattr(module, name, new)
        else:
            convert_global_batchnorm(child)
    return module
