"""Build the model for a run: preset + field overrides, or a `save_pretrained` folder."""

from __future__ import annotations

from text4vpr.config import ConfigError, from_dict, to_dict
from text4vpr.data.tokenizer import load_tokenizer
from text4vpr.models import ModelConfig, Text4VPR, paper_config, tiny_config
from text4vpr.models.sync_batchnorm import convert_global_batchnorm


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(section, vocab_size: int, image_size: int, gradient_checkpointing: bool) -> ModelConfig:
    """Preset (tiny | paper | custom) updated by `model.config`, checked key by key."""
    presets = {
        "tiny": lambda: tiny_config(vocab_size=vocab_size, image_size=image_size),
        "paper": paper_config,
        "custom": ModelConfig,
    }
    if section.preset not in presets:
        raise ConfigError(f"model.preset: unknown preset {section.preset!r} (tiny | paper | custom)")
    merged = _deep_merge(to_dict(presets[section.preset]()), section.config)
    if gradient_checkpointing:
        merged["image"]["gradient_checkpointing"] = True
    return from_dict(ModelConfig, merged, prefix="model.config")


def build_model(section, tokenizer_path: str, loader_cfg, train_cfg, world_size: int):
    """Returns (model, tokenizer). BatchNorm goes global across ranks when distributed."""
    tokenizer = load_tokenizer(tokenizer_path)
    if section.init_from:
        model = Text4VPR.from_pretrained(section.init_from)
    else:
        cfg = model_config(section, len(tokenizer), loader_cfg.image_size, train_cfg.gradient_checkpointing)
        model = Text4VPR(cfg)
    if world_size > 1 and train_cfg.global_batchnorm:
        convert_global_batchnorm(model)
    if train_cfg.compile:
        mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
        model.compile(mode=mode)  # in place: keeps the module type and its state_dict keys
    return model, tokenizer
