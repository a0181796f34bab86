"""Optimizer and learning-rate schedule: AdamW with parameter groups, warm-up + cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Parameter names containing one of these get no weight decay (norms, biases, temperatures).
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "layer_norm", "bn", "temperature", "logit_scale", "tau", "cls_token", "position_embeddings", "mask_token")


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


def _is_backbone(name: str) -> bool:
    """Pretrained trunks: the DINOv2 blocks and the T5 encoder (heads train at the base lr)."""
    return ".backbone." in f".{name}" or name.startswith("backbone.")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    lname = name.lower()
    return param.ndim <= 1 or any(m in lname for m in NO_DECAY_MARKERS)


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into (backbone|head) × (decay|no-decay) groups."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((_is_backbone(name), _no_decay(name, p)), []).append(p)
    out = []
    for (backbone, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.lr * (cfg.backbone_lr_mult if backbone else 1.0),
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "name": f"{'backbone' if backbone else 'head'}/{'no_decay' if no_decay else 'decay'}",
            }
        )
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.fused and torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg), **kwargs)


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
