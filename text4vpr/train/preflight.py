"""Everything a run's config names, checked before the run writes a single file: shard
folders, tokenizer, backbone folders, `model.init_from`, the output path and the model
config. A mistake is one line naming the key; the corrected command then just runs."""

from __future__ import annotations

from pathlib import Path

from text4vpr.config import ConfigError
from text4vpr.data.shard_reader import MANIFEST
from text4vpr.utils.local_folder import MODEL_FILES, TOKENIZER_FILES, require_local_folder

DEMO = "or data.synthetic.locations > 0 for the demo data"


def _local_shard_folder(key: str, value: str) -> None:
    """A plain local path must be a built shard folder (patterns and URLs are checked on read)."""
    if any(mark in value for mark in ("{", "::", "://")):
        return
    p = Path(value)
    if not p.is_dir():
        raise ConfigError(f"{key}={value}: {'a file, not' if p.exists() else 'no such'} folder; give a shard "
                          "folder written by `text4vpr shards build`")
    if not (p / MANIFEST).is_file():
        raise ConfigError(f"{key}={value}: no {MANIFEST} (not a finished `text4vpr shards build` output)")


def check_run_inputs(cfg) -> None:
    """Raise ConfigError / LocalFolderError for the first key whose path or value cannot work."""
    d, m = cfg.data, cfg.model
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out}: a file, not a folder; choose a folder for the run")
    if d.synthetic.locations == 0:
        for key in ("train_shards", "val_shards"):
            if not getattr(d, key):
                raise ConfigError(f"data.{key}: not set; give the shard folder of that split ({DEMO})")
        for key in ("train_shards", "val_shards", "test_shards"):
            if getattr(d, key):
                _local_shard_folder(f"data.{key}", getattr(d, key))
        if not d.loader.tokenizer:
            raise ConfigError(f"data.loader.tokenizer: not set; give the local tokenizer folder, e.g. your T5 folder ({DEMO})")
    if d.loader.tokenizer:
        require_local_folder("data.loader.tokenizer", d.loader.tokenizer, TOKENIZER_FILES)
    if m.init_from:
        require_local_folder("model.init_from", m.init_from, MODEL_FILES)
        return
    for part in ("image", "text"):
        section = m.config.get(part)
        path = section.get("pretrained") if isinstance(section, dict) else None
        if path:
            require_local_folder(f"model.config.{part}.pretrained", path, MODEL_FILES)
    from text4vpr.train.model import model_config

    model_config(m, 1000, d.loader.image_size, cfg.train.gradient_checkpointing)  # unknown keys, types, ranges
