"""Optimizer and learning-rate schedule: AdamW over the model's parameter groups, warm-up + cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from text4vpr.config import check_choice, check_range


@dataclass
class OptimConfig:
    """AdamW and schedule. `backbone_lr_mult` scales the lr of the pretrained trunks."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_mult: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    fused: bool = False  # fused AdamW kernel (CUDA only)

    def __post_init__(self) -> None:
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        check_range("optim.lr", self.lr, 0, low_open=True)
        for key in ("weight_decay", "backbone_lr_mult", "warmup_steps", "grad_clip"):
            check_range(f"optim.{key}", getattr(self, key), 0)
        check_range("optim.eps", self.eps, 0, low_open=True)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        for i, b in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", b, 0, 1, high_open=True)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, extra: list | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's groups; `extra` (e.g. a learnable temperature) joins without decay."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused and torch.cuda.is_available():
        kwargs["fused"] = True
    groups = model.parameter_groups(cfg.lr, cfg.weight_decay, cfg.backbone_lr_mult)  # backbone/head x decay
    if extra:
        groups.append({"name": "loss", "params": extra, "lr": cfg.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, **kwargs)


def drop_update(optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Skip this step's update: clear the gradients, and under fp16 let the loss scaler back off.

    Clipping already ran the scaler's `unscale_`; without `update()` its next `unscale_` raises
    ("already been called on this optimizer since the last update()") and the run dies.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up, then cosine or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (cosine | constant)")
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """LambdaLR stepped once per optimizer step (never per process: it is not prepared)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
