"""Text4VPR models: DINOv2 + Sinkhorn image tower, T5 text tower, named configs."""

from text4vpr.models.config import (
    AggregationConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoderConfig,
    paper_config,
    tiny_config,
)
from text4vpr.models.text4vpr import Text4VPR, is_no_decay, load_model

__all__ = [
    "AggregationConfig",
    "ImageEncoderConfig",
    "ModelConfig",
    "Text4VPR",
    "TextEncoderConfig",
    "is_no_decay",
    "load_model",
    "paper_config",
    "tiny_config",
]
