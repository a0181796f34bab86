"""Import the published Text4VPR checkpoint (.pth) into our model, as the published code saved it.

Layouts: one file holding `image_encoder_state_dict` and `text_encoder_state_dict` (the
published train script), or two files, each a bare `state_dict()` of one encoder (an older
published test script loads them so). `module.` path components (DataParallel) are removed.
Only `torch.load(weights_only=True)` reads the files.

Image side (an nn.Sequential: 0 = `DINOv2` wrapper holding the hub model as `.model`,
1 = `image_aggregation`). The backbone prefix (`0.model.` or `0.`) is detected from the
`patch_embed.proj.weight` key. torch.hub DINOv2 names -> transformers `Dinov2Model` names
(under `image_encoder.backbone.`):
    cls_token, mask_token, pos_embed   -> embeddings.cls_token, .mask_token, .position_embeddings
    patch_embed.proj.*                 -> embeddings.patch_embeddings.projection.*
    blocks.i.norm1.* / norm2.*         -> encoder.layer.i.norm1.* / norm2.*
    blocks.i.attn.qkv.{weight,bias}    -> split in three along dim 0 -> attention q/k/v
    blocks.i.attn.proj.*               -> attention output projection
    blocks.i.ls1.gamma / ls2.gamma     -> encoder.layer.i.layer_scale1/2.lambda1
    blocks.i.mlp.fc1.* / fc2.*         -> encoder.layer.i.mlp.fc1.* / fc2.*
    norm.*                             -> layernorm.* (kept, unused: the method has no final norm)
(attention names follow the installed transformers: q_proj/k_proj/v_proj/o_proj, or the
older attention.attention.query/key/value + attention.output.dense.)
    1.temperature (0-dim)              -> aggregation.tau (shape (1,))
    1.cluster_features.*, 1.score.*    -> aggregation.* (same names)

Text side (`LanguageEncoder`): the T5 encoder under any prefix (`llm_model.` upstream;
detected from the `encoder.final_layer_norm.weight` key; a bare T5 stack without
`shared.weight` is fine), plus the head:
    inter_mlp.0.0.* (Linear), inter_mlp.0.1.* (BatchNorm1d)  -> text_encoder.projection.0/1.*
        (`get_mlp2([H, D])` nests Sequential(Sequential(Linear, BatchNorm1d)))
    inter_module.i.* (TransformerEncoderLayer)               -> text_encoder.layers.i.*
    intra_module.*                                           -> dropped, listed in the report
        (built in `__init__`, never used in `forward`)

Upstream trained with the projection frozen at init (an accident, docs/method.md); its
weights are the random init and are imported as they are. Any other key left unmapped, any
of our keys left missing, or a shape mismatch is an error that lists them.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from text4vpr.models.config import AggregationConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from text4vpr.utils.errors import InputError, weights_only_reason

IMAGE_KEY = "image_encoder_state_dict"
TEXT_KEY = "text_encoder_state_dict"
UNUSED_TEXT_PREFIXES = ("intra_module.",)  # upstream LanguageEncoder builds it, forward never uses it
REPORT_NAME = "conversion.json"

_BLOCK_RENAMES = {
    "norm1": "norm1", "norm2": "norm2", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings", "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}


class UpstreamConversionError(InputError, ValueError):
    """The checkpoint does not map one-to-one onto our model."""


def _attention_names(target_keys: set[str]) -> tuple[tuple[str, str, str], str]:
    """(q, k, v) and output projection module names of the installed Dinov2 attention."""
    if any(".attention.q_proj." in k for k in target_keys):
        return ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"
    old = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    return old, "attention.output.dense"


def _prefix_of(keys, suffix: str, what: str) -> str:
    hits = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
    if len(hits) != 1:
        raise UpstreamConversionError(f"cannot find the {what} in the checkpoint (no unique key ending {suffix!r})")
    return hits[0]


def convert_image_state(upstream: dict, target_keys: set[str]) -> tuple[dict, list[str]]:
    """Upstream image-side dict -> our `image_encoder.backbone.*` / `aggregation.*` keys."""
    qkv_names, out_name = _attention_names(target_keys)
    prefix = _prefix_of(upstream, "patch_embed.proj.weight", "DINOv2 backbone")
    out, unmapped = {}, []
    for key, value in upstream.items():
        if key.startswith("1."):
            name = "tau" if key == "1.temperature" else key[2:]
            out["aggregation." + name] = value.reshape(1) if name == "tau" else value  # ours is (1,), theirs 0-dim
            continue
        if not key.startswith(prefix):
            unmapped.append(key)
            continue
        name = key[len(prefix):]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", name)
        if m:
            i, mod, leaf = m.groups()
            base = f"image_encoder.backbone.encoder.layer.{i}."
            if mod == "attn.qkv":
                for part, tgt in zip(value.chunk(3, dim=0), qkv_names):
                    out[f"{base}{tgt}.{leaf}"] = part.clone()
                continue
            if mod == "attn.proj":
                out[f"{base}{out_name}.{leaf}"] = value
                continue
            full = f"{mod}.{leaf}"
            tgt = _BLOCK_RENAMES.get(full) or _BLOCK_RENAMES.get(mod)
            if tgt is None:
                unmapped.append(key)
                continue
            out[base + (tgt if full in _BLOCK_RENAMES else f"{tgt}.{leaf}")] = value
            continue
        mod, _, leaf = name.rpartition(".")
        if name in _TOP_RENAMES:
            out["image_encoder.backbone." + _TOP_RENAMES[name]] = value
        elif mod in _TOP_RENAMES:
            out[f"image_encoder.backbone.{_TOP_RENAMES[mod]}.{leaf}"] = value
        else:
            unmapped.append(key)
    return out, unmapped


def convert_text_state(upstream: dict) -> tuple[dict, list[str], list[str]]:
    """Upstream text-side dict -> (our `text_encoder.*` keys, unmapped keys, dropped unused keys)."""
    prefix = _prefix_of(upstream, "encoder.final_layer_norm.weight", "T5 encoder")
    out, unmapped, dropped = {}, [], []
    for key, value in upstream.items():
        m = re.fullmatch(r"inter_mlp\.0\.([01])\.(.+)", key)  # get_mlp2 nesting: Sequential(Sequential(Linear, BN))
        if key.startswith(UNUSED_TEXT_PREFIXES):
            dropped.append(key)
        elif m:
            out[f"text_encoder.projection.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith("inter_module."):
            out["text_encoder.layers." + key[len("inter_module."):]] = value
        elif key.startswith(prefix):
            out["text_encoder.backbone." + key[len(prefix):]] = value
        else:
            unmapped.append(key)
    shared, embed = "text_encoder.backbone.shared.weight", "text_encoder.backbone.encoder.embed_tokens.weight"
    if shared not in out and embed in out:
        out[shared] = out[embed]
    if embed not in out and shared in out:
        out[embed] = out[shared]
    return out, unmapped, dropped


def upstream_model_config(image_sd: dict, text_sd: dict, dinov2_dir, t5_dir, trainable_blocks: int = 2) -> ModelConfig:
    """Our config for the checkpoint: backbone configs from the folders, head shapes from the tensors."""
    from transformers import AutoConfig

    dcfg = AutoConfig.from_pretrained(str(dinov2_dir), local_files_only=True).to_dict()
    tcfg = AutoConfig.from_pretrained(str(t5_dir), local_files_only=True).to_dict()
    missing = [f"{IMAGE_KEY}:{k}" for k in ("1.score.0.weight", "1.score.3.weight", "1.cluster_features.3.weight")
               if k not in image_sd]
    if missing:
        raise UpstreamConversionError(f"no aggregation head in the checkpoint: missing {', '.join(missing)}")
    n_clusters, hidden = image_sd["1.score.3.weight"].shape[0], image_sd["1.score.0.weight"].shape[0]
    cluster_dim = image_sd["1.cluster_features.3.weight"].shape[0]
    n_res = len({k.split(".")[1] for k in text_sd if k.startswith("inter_module.")})
    ff = text_sd["inter_module.0.linear1.weight"].shape[0] if n_res else 8192
    return ModelConfig(
        image=ImageEncoderConfig(backbone_config=dcfg, trainable_blocks=trainable_blocks),
        aggregation=AggregationConfig(num_clusters=n_clusters, cluster_dim=cluster_dim, hidden_dim=hidden),
        text=TextEncoderConfig(backbone_config=tcfg, num_residual_layers=n_res, residual_ff=ff),
        embed_dim=n_clusters * cluster_dim,
    )


def strip_module_prefixes(state: dict) -> dict:
    """Remove DataParallel's `module.` path components (at any depth) from every key."""
    out = {}
    for key, value in state.items():
        new = ".".join(part for part in key.split(".") if part != "module")
        if new in out:
            raise UpstreamConversionError(f"two keys become {new!r} once `module.` is removed")
        out[new] = value
    return out


def _side_of(state: dict) -> str | None:
    """"image" or "text" for a bare encoder state dict, by its backbone keys; None if neither."""
    keys = list(state)
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "image"
    if any(k.endswith("encoder.final_layer_norm.weight") for k in keys):
        return "text"
    return None


def _load(path) -> dict:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UpstreamConversionError(f"{path}: refused to unpickle ({weights_only_reason(e)}): only tensors and "
                                      "plain containers are read from a checkpoint (torch.load weights_only)") from None
    except (RuntimeError, EOFError) as e:  # OSError (missing, unreadable) names its path itself
        raise UpstreamConversionError(f"{path}: not a readable torch file ({weights_only_reason(e)})") from None
    if not isinstance(ckpt, dict):
        raise UpstreamConversionError(f"{path}: not an upstream Text4VPR checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def load_upstream_checkpoint(paths) -> tuple[dict, dict]:
    """(image state, text state), `module.` removed, from one combined file or two bare ones."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1:
        ckpt = _load(paths[0])
        missing = [k for k in (IMAGE_KEY, TEXT_KEY) if k not in ckpt]
        if missing:
            raise UpstreamConversionError(
                f"{paths[0]}: not an upstream Text4VPR checkpoint, missing {missing} "
                "(for two files, each a bare encoder state_dict, pass both)")
        return strip_module_prefixes(ckpt[IMAGE_KEY]), strip_module_prefixes(ckpt[TEXT_KEY])
    if len(paths) != 2:
        raise UpstreamConversionError(f"expected one combined checkpoint or two encoder files, got {len(paths)} paths")
    sides = {}
    for path in paths:
        state = strip_module_prefixes(_load(path))
        side = _side_of(state)
        if side is None or side in sides:
            raise UpstreamConversionError(
                f"{path}: not {'an' if side is None else 'the other'} upstream encoder state_dict "
                "(expected one image file with patch_embed.proj.weight and one text file with encoder.final_layer_norm.weight)")
        sides[side] = state
    return sides["image"], sides["text"]


def convert_upstream(ckpt_paths, dinov2_dir, t5_dir, out_dir=None, trainable_blocks: int = 2):
    """Build our model from upstream .pth file(s) -> (model, report); saved with the T5 tokenizer
    and the report (`conversion.json`) when `out_dir` is set."""
    from text4vpr.models.text4vpr import Text4VPR

    image_sd, text_sd = load_upstream_checkpoint(ckpt_paths)
    model = Text4VPR(upstream_model_config(image_sd, text_sd, dinov2_dir, t5_dir, trainable_blocks))
    target = model.state_dict()
    img, unmapped_img = convert_image_state(image_sd, set(target))
    txt, unmapped_txt, dropped = convert_text_state(text_sd)
    state = {**img, **txt}
    _check_keys(state, target, [f"{IMAGE_KEY}:{k}" for k in unmapped_img] + [f"{TEXT_KEY}:{k}" for k in unmapped_txt])
    model.load_state_dict(state, strict=True)
    paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
    report = {
        "sources": [str(p) for p in paths],
        "image_tensors": len(image_sd), "text_tensors": len(text_sd),
        "dropped_unused": [f"{TEXT_KEY}:{k}" for k in sorted(dropped)],
    }
    if out_dir is not None:
        from text4vpr.utils.atomic import atomic_write_json

        model.save_pretrained(out_dir, tokenizer=_maybe_tokenizer(t5_dir))
        atomic_write_json(Path(out_dir) / REPORT_NAME, report)
    return model, report


def _check_keys(state: dict, target: dict, unmapped: list[str]) -> None:
    problems = []
    if unmapped:
        problems.append("unmapped upstream keys: " + ", ".join(sorted(unmapped)))
    extra = sorted(set(state) - set(target))
    if extra:
        problems.append("keys our model does not have: " + ", ".join(extra))
    missing = sorted(set(target) - set(state))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    bad = [f"{k} {tuple(state[k].shape)} vs ours {tuple(target[k].shape)}"
           for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if bad:
        problems.append("shape mismatches: " + ", ".join(bad))
    if problems:
        raise UpstreamConversionError("upstream checkpoint does not match the model:\n  " + "\n  ".join(problems))


def _maybe_tokenizer(t5_dir):
    """The tokenizer saved beside the T5 weights, or None if the folder has none."""
    d = Path(t5_dir)
    if not any((d / n).exists() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        return None
    from text4vpr.data.tokenizer import load_tokenizer

    return load_tokenizer(d)
