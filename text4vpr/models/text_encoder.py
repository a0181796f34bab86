"""Text tower: HF encoder -> max-pool over real tokens -> Linear+BatchNorm -> residual layers.

docs/method.md#text-encoder: T5 encoder last hidden state, max-pool over real tokens only (so padding never
changes a result), projection Linear(H -> D) + BatchNorm1d(D), then twice
x <- x + TransformerEncoderLayer(x) on a length-1 sequence. Output is not normalised.

`freeze_projection_at_init=True` reproduces the upstream accident: upstream encodes one
description at a time and, for a batch of one, ran the projection in eval mode under
no_grad, so it kept its random init and BatchNorm its initial running statistics, and no
gradient reached the T5 encoder behind it (so it is frozen too in this mode). Off by
default: the intended design trains both.
"""

from __future__ import annotations

import torch
from torch import nn

from text4vpr.models.config import TextEncoderConfig
from text4vpr.utils.local_folder import MODEL_FILES, require_local_folder


DROPOUT_KEYS = ("dropout_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def build_text_backbone(cfg: TextEncoderConfig) -> nn.Module:
    """T5EncoderModel (or AutoModel for other encoders) from a folder, a config dict, or shapes;
    `cfg.dropout`, when set, replaces every dropout probability of the backbone's config."""
    backbone = _build_text_backbone(cfg)
    if cfg.dropout is not None:
        _set_dropout(backbone, cfg.dropout)
    return backbone


def _set_dropout(backbone: nn.Module, p: float) -> None:
    for key in DROPOUT_KEYS:
        if hasattr(backbone.config, key):
            setattr(backbone.config, key, p)
    for m in backbone.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # e.g. T5Attention keeps a float p
            m.dropout = p


def _build_text_backbone(cfg: TextEncoderConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel, T5Config, T5EncoderModel

    if cfg.backbone_config is not None:
        d = dict(cfg.backbone_config)
        if d.get("model_type") == "t5":
            return T5EncoderModel(T5Config.from_dict(d))
        return AutoModel.from_config(AutoConfig.for_model(**d))
    if cfg.pretrained is not None:
        require_local_folder("model.config.text.pretrained", cfg.pretrained, MODEL_FILES)
        hf_cfg = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        cls = T5EncoderModel if hf_cfg.model_type == "t5" else AutoModel
        return cls.from_pretrained(cfg.pretrained, local_files_only=True)
    config = T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
    )
    return T5EncoderModel(config)


def backbone_width(backbone: nn.Module) -> int:
    c = backbone.config
    return int(getattr(c, "d_model", None) or c.hidden_size)


def masked_max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over real tokens: hidden (N, L, H), mask (N, L) -> (N, H)."""
    fill = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), fill).amax(dim=1)


class TextEncoder(nn.Module):
    """(N, L) token ids + mask -> (N, D) raw text vectors."""

    def __init__(self, cfg: TextEncoderConfig, embed_dim: int):
        super().__init__()
        self.backbone = build_text_backbone(cfg)
        width = backbone_width(self.backbone)
        self.projection = nn.Sequential(nn.Linear(width, embed_dim), nn.BatchNorm1d(embed_dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                embed_dim, cfg.residual_heads, cfg.residual_ff, cfg.residual_dropout,
                activation="relu", batch_first=True, norm_first=False,
            )
            for _ in range(cfg.num_residual_layers)
        )
        self.freeze_projection = cfg.freeze_projection_at_init
        # Upstream ran the projection under no_grad, so no gradient ever reached T5 either:
        # freeze it too (a trainable parameter that never gets a gradient breaks DDP's reducer).
        if cfg.freeze_backbone or self.freeze_projection:
            self.backbone.requires_grad_(False)
        if self.freeze_projection:
            self.projection.requires_grad_(False)
            self.projection.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.freeze_projection:
            self.projection.eval()  # upstream accident: BatchNorm never leaves eval mode
        return self

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-description part: encoder, masked max-pool, the projection's Linear: (N, L) -> (N, D).

        Everything up to the BatchNorm, the one layer that mixes descriptions: gradient
        caching encodes this part in micro-batches and `head` on the whole batch.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, H)
        pooled = masked_max_pool(hidden, attention_mask)  # (N, H)
        return self._projection_part(0, pooled)  # (N, D)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the batch (all ranks with GlobalBatchNorm1d), then the residual layers: (N, D) -> (N, D)."""
        x = self._projection_part(1, z)  # (N, D)
        x = x.unsqueeze(1)  # (N, 1, D): each description is a sequence of length 1
        for layer in self.layers:
            x = x + layer(x)
        return x.squeeze(1)  # (N, D)

    def _projection_part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_projection:  # upstream accident: no gradient through the projection
            with torch.no_grad():
                return self.projection[i](x)
        return self.projection[i](x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))
