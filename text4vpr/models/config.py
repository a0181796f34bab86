"""Model config dataclasses (image, aggregation, text, model) and the named configs.

A backbone is given either as a local Hugging Face folder (`pretrained`), as a full config
dict (`backbone_config`, what `save_pretrained` writes so a saved model is self-contained),
or by the few shape fields below (random init: tests, demo, benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from text4vpr.config import to_dict
from text4vpr.utils.hashing import bytes_sha256


@dataclass
class ImageEncoderConfig:
    """DINOv2 backbone: the first blocks frozen, the last `trainable_blocks` trained (docs/method.md#dinov2-trunk)."""

    pretrained: str | None = None  # local Hugging Face DINOv2 folder
    backbone_config: dict[str, Any] | None = None  # full Dinov2Config dict; wins over the fields below
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 14
    image_size: int = 252  # input side in pixels; position embeddings are interpolated for others
    mlp_ratio: int = 4
    trainable_blocks: int = 2
    gradient_checkpointing: bool = False  # recompute the trained blocks in backward


@dataclass
class AggregationConfig:
    """Sinkhorn cluster aggregation (docs/method.md#sinkhorn-aggregation): K clusters of dimension D, output D*K."""

    num_clusters: int = 16
    cluster_dim: int = 128
    hidden_dim: int = 512
    dropout: float = 0.3
    sinkhorn_iters: int = 3
    tau_init: float = 1.0


@dataclass
class TextEncoderConfig:
    """T5 (or any HF encoder with last_hidden_state) + max-pool + projection + residual layers."""

    pretrained: str | None = None  # local Hugging Face encoder folder (T5 by default)
    backbone_config: dict[str, Any] | None = None  # full HF config dict; wins over the fields below
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    freeze_backbone: bool = False  # the method trains the T5 encoder (docs/method.md#t5-and-masked-max-pool); True keeps it fixed
    dropout: float | None = None  # override the backbone's dropout (T5 dropout_rate); None keeps it
    num_residual_layers: int = 2
    residual_heads: int = 4
    residual_ff: int = 8192
    residual_dropout: float = 0.1
    # Upstream accident (docs/method.md#untrained-projection): the Linear+BatchNorm projection stays at its random init and
    # BatchNorm at its initial running statistics. True reproduces that (frozen, BN in eval).
    freeze_projection_at_init: bool = False


@dataclass
class ModelConfig:
    """Two-tower Text4VPR; `embed_dim` must equal cluster_dim * num_clusters."""

    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 2048

    def __post_init__(self) -> None:
        agg = self.aggregation
        if agg.num_clusters * agg.cluster_dim != self.embed_dim:
            raise ValueError(
                f"embed_dim {self.embed_dim} != aggregation.num_clusters * cluster_dim "
                f"({agg.num_clusters} * {agg.cluster_dim})"
            )
        if self.image.trainable_blocks < 0:
            raise ValueError(f"image.trainable_blocks must be >= 0, got {self.image.trainable_blocks}")


def config_hash(cfg: ModelConfig) -> str:
    """Stable short hash of a config (sorted JSON, sha256), used to pair models with indexes."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return bytes_sha256(blob.encode())[:16]


def tiny_config(vocab_size: int = 300, image_size: int = 56) -> ModelConfig:
    """A few-kB random-init model for CPU tests and the demo (D = 64)."""
    return ModelConfig(
        image=ImageEncoderConfig(
            hidden_size=32, num_layers=2, num_heads=2, patch_size=14, image_size=image_size, trainable_blocks=1
        ),
        aggregation=AggregationConfig(num_clusters=4, cluster_dim=16, hidden_dim=32),
        text=TextEncoderConfig(
            vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            residual_heads=4, residual_ff=128,
        ),
        embed_dim=64,
    )


def paper_config(dinov2_path: str | None = None, t5_path: str | None = None) -> ModelConfig:
    """The paper setup: DINOv2-B/14 at 252 px, 2 trainable blocks, 16x128 clusters, T5, D = 2048.

    With no paths the backbones are random-init with the paper shapes (T5-base encoder).
    """
    return ModelConfig(
        image=ImageEncoderConfig(pretrained=dinov2_path),
        aggregation=AggregationConfig(),
        text=TextEncoderConfig(pretrained=t5_path),
        embed_dim=2048,
    )


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported for callers building variants."""
    return dataclasses.replace(cfg, **changes)
