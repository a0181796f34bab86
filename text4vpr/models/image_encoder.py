"""DINOv2 patch-token feature map through transformers' `Dinov2Model`.

docs/method.md#dinov2-trunk: patch embedding + CLS + position embeddings, the first L-T blocks without gradient,
the last T blocks trained, no final layer norm, CLS dropped, tokens reshaped to a map.
Position embeddings are resized for the input grid as the DINOv2 hub code does (the
published model was trained so), not as `Dinov2Embeddings` does; see position_embedding.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from text4vpr.models.config import ImageEncoderConfig
from text4vpr.models.position_embedding import HubPositionEmbedding
from text4vpr.utils.local_folder import MODEL_FILES, require_local_folder


def build_dinov2(cfg: ImageEncoderConfig) -> nn.Module:
    """A `Dinov2Model` from a local folder, a saved config dict, or the shape fields."""
    from transformers import Dinov2Config, Dinov2Model

    if cfg.backbone_config is not None:
        return Dinov2Model(Dinov2Config.from_dict(dict(cfg.backbone_config)))
    if cfg.pretrained is not None:
        require_local_folder("model.config.image.pretrained", cfg.pretrained, MODEL_FILES)
        return Dinov2Model.from_pretrained(cfg.pretrained, local_files_only=True)
    config = Dinov2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
        mlp_ratio=cfg.mlp_ratio,
    )
    return Dinov2Model(config)


class ImageEncoder(nn.Module):
    """Images (N, 3, H, W) -> patch feature map (N, C, H/p, W/p); H, W multiples of the patch p."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.backbone = build_dinov2(cfg)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        n_layers = len(self.backbone.encoder.layer)
        if cfg.trainable_blocks > n_layers:
            raise ValueError(f"image.trainable_blocks={cfg.trainable_blocks} > {n_layers} DINOv2 blocks")
        self.num_frozen = n_layers - cfg.trainable_blocks
        self.patch_size = int(self.backbone.config.patch_size)
        self.hidden_size = int(self.backbone.config.hidden_size)
        self.position_embedding = HubPositionEmbedding()  # hub resize, cached per grid
        self._freeze()

    def _freeze(self) -> None:
        """Embeddings, the first blocks and the (unused) final layer norm get no gradient."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for layer in self.backbone.encoder.layer[self.num_frozen :]:
            for p in layer.parameters():
                p.requires_grad_(True)

    @property
    def frozen_is_deterministic(self) -> bool:
        """True when the frozen blocks have no dropout / drop-path (so their output can be cached)."""
        c = self.backbone.config
        return all(float(getattr(c, k, 0.0) or 0.0) == 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"))

    def _check_size(self, h: int, w: int) -> None:
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")

    @torch.no_grad()
    def frozen_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings and the frozen blocks: (N, 3, H, W) -> (N, 1 + hw, C), no gradient.

        Deterministic for a given image (the method has no augmentation), so a trainer may cache
        it and call `forward_from_tokens` in later epochs (the frozen-trunk cache).
        """
        x = self.embed(images)  # (N, 1 + hw, C)
        for layer in self.backbone.encoder.layer[: self.num_frozen]:
            x = layer(x)
        return x

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + position embeddings resized as the DINOv2 hub code does:
        (N, 3, H, W) -> (N, 1 + hw, C). Replaces `Dinov2Embeddings.forward`, whose resize differs."""
        self._check_size(*images.shape[-2:])
        emb = self.backbone.embeddings
        x = emb.patch_embeddings(images)  # (N, hw, C)
        x = torch.cat((emb.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (N, 1 + hw, C)
        x = x + self.position_embedding(emb.position_embeddings, self.grid(*images.shape[-2:]))
        return emb.dropout(x)

    def forward_from_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The trained blocks on frozen tokens (N, 1 + hw, C) -> patch map (N, C, h, w)."""
        for layer in self.backbone.encoder.layer[self.num_frozen :]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        tokens = x[:, 1:]  # drop CLS: (N, hw, C)
        fmap = tokens.reshape(x.shape[0], grid[0], grid[1], -1)  # (N, h, w, C)
        return fmap.permute(0, 3, 1, 2)  # (N, C, h, w)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/p, W/p)."""
        return self.forward_from_tokens(self.frozen_tokens(images), self.grid(*images.shape[-2:]))
