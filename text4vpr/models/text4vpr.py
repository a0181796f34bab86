"""The two-tower Text4VPR model: batched encoders plus self-contained safetensors I/O."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from einops import pack, unpack
from torch import nn

from text4vpr.config import from_dict, to_dict
from text4vpr.data.transforms import normalize_images
from text4vpr.models.aggregation import SinkhornAggregation
from text4vpr.models.config import ModelConfig, config_hash
from text4vpr.models.image_encoder import ImageEncoder
from text4vpr.models.text_encoder import TextEncoder
from text4vpr.utils.atomic import atomic_save_file, atomic_write_json
from text4vpr.utils.errors import InputValueError, MissingInputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "text4vpr"
FORMAT_VERSION = 1


class Text4VPR(nn.Module):
    """Image tower (DINOv2 + Sinkhorn aggregation) and text tower (T5 + head), D-dim outputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_settings: dict | None = None  # how its text was tokenised in training (data.text_settings)
        self.image_encoder = ImageEncoder(config.image)
        self.aggregation = SinkhornAggregation(self.image_encoder.hidden_size, config.aggregation)
        self.text_encoder = TextEncoder(config.text, config.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # ------------------------------------------------------------------ encoding
    def encode_images(self, images: torch.Tensor, view_mask: torch.Tensor | None = None,
                      views_complete: bool | None = None) -> torch.Tensor:
        """(B, V, 3, H, W) -> (B, V, D) L2-normalised, zeros for missing views; (N, 3, H, W) -> (N, D).

        uint8 images (the loader's `image_dtype="uint8"` batches) are ImageNet-normalised here,
        on the model's device: 4x fewer bytes cross the host-to-device link. `views_complete`
        (known on the host) spares the device sync of checking the mask, and a graph break.
        """
        if images.dtype == torch.uint8:
            images = normalize_images(images)
        return self._per_present_view(images, view_mask, 3, lambda x: self.aggregation(self.image_encoder(x)),
                                      self.embed_dim, views_complete)

    @torch.no_grad()
    def frozen_image_tokens(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V, 3, H, W) -> (B, V, 1 + hw, C): output of the frozen DINOv2 blocks (zeros for
        missing views). Cacheable: `encode_images_from_tokens` continues from it."""
        if images.dtype == torch.uint8:
            images = normalize_images(images)
        enc = self.image_encoder
        tokens = 1 + images.shape[-2] // enc.patch_size * (images.shape[-1] // enc.patch_size)
        return self._per_present_view(images, view_mask, 3, enc.frozen_tokens, (tokens, enc.hidden_size))

    def encode_images_from_tokens(self, tokens: torch.Tensor, view_mask: torch.Tensor | None = None,
                                  views_complete: bool | None = None) -> torch.Tensor:
        """(B, V, 1 + hw, C) frozen tokens (square grid) -> (B, V, D), equal to `encode_images`."""
        side = int(round((tokens.shape[-2] - 1) ** 0.5))
        if side * side != tokens.shape[-2] - 1:
            raise ValueError(f"{tokens.shape[-2] - 1} patch tokens do not form a square grid")
        fn = lambda x: self.aggregation(self.image_encoder.forward_from_tokens(x, (side, side)))  # noqa: E731
        return self._per_present_view(tokens, view_mask, 2, fn, self.embed_dim, views_complete)

    def _per_present_view(self, x, view_mask, item_dims: int, fn, out_shape, complete: bool | None = None) -> torch.Tensor:
        """Apply `fn` to the present views only: x (*lead, *item) -> (*lead, *out_shape), zeros elsewhere."""
        lead = x.shape[:-item_dims]
        flat = x.reshape(-1, *x.shape[-item_dims:])  # (B*V, *item)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        keep = None if complete else _keep_rows(view_mask, lead, flat.shape[0], x.device)
        if keep is None:
            out = fn(flat)
        else:
            out = flat.new_zeros(flat.shape[0], *out_shape, dtype=torch.float32)  # (B*V, *out)
            if keep.any():
                res = fn(flat[keep])
                out = out.to(res.dtype).index_put((keep,), res)
        return out.reshape(*lead, *out_shape)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     views_complete: bool | None = None, head: bool = True) -> torch.Tensor:
        """(B, V, L) -> (B, V, D) raw vectors, zeros where the mask is all 0; (N, L) -> (N, D).

        `head=False` stops before the BatchNorm (`TextEncoder.features`): gradient caching
        runs `text_head` on the whole batch's present views afterwards.
        """
        encoder = self.text_encoder if head else self.text_encoder.features
        ids, packed = pack([input_ids], "* l")  # (B*V, L): each view of each location one row
        mask, _ = pack([attention_mask], "* l")  # (B*V, L)
        keep = mask.bool().any(dim=1)  # (B*V,)
        if views_complete or bool(keep.all()):
            out = encoder(ids, mask)
        else:
            enc = encoder(ids[keep], mask[keep]) if keep.any() else None
            out = torch.zeros(ids.shape[0], self.embed_dim, device=ids.device,
                              dtype=enc.dtype if enc is not None else torch.float32)
            if enc is not None:
                out = out.index_put((keep,), enc)
        return unpack(out, packed, "* d")[0]  # (B, V, D), or (N, D)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        """(P, D) pre-BatchNorm features of present views -> (P, D) text vectors (the batch-coupled part)."""
        return self.text_encoder.head(features)

    def forward(self, images, view_mask, input_ids, attention_mask, frozen_tokens=None,
                views_complete: bool | None = None, text_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers on a loader batch: ((B, V, D) image vectors, (B, V, D) text vectors).

        With `frozen_tokens` (B, V, 1 + hw, C) from `frozen_image_tokens` (the trainer's
        frozen-trunk cache) the images are not needed and only the trained blocks run.
        `views_complete=True` promises every view is present (the trainer checks on the host).
        `text_head=False` returns the text features before the BatchNorm instead (see `text_head`).
        """
        if frozen_tokens is not None:
            img = self.encode_images_from_tokens(frozen_tokens, view_mask, views_complete)
        else:
            img = self.encode_images(images, view_mask, views_complete)
        return img, self.encode_texts(input_ids, attention_mask, views_complete, head=text_head)

    # ------------------------------------------------------------------ training helpers
    def backbone_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable DINOv2 blocks and T5 encoder weights (for a backbone lr multiplier)."""
        for name, p in self.named_parameters():
            if p.requires_grad and _is_backbone(name):
                yield name, p

    def head_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Aggregation, text projection and residual layers (trained from scratch)."""
        for name, p in self.named_parameters():
            if p.requires_grad and not _is_backbone(name):
                yield name, p

    def parameter_groups(self, lr: float, weight_decay: float = 0.0, backbone_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: {backbone, head} x {decay, no decay (norms, biases, scalars)}."""
        groups = []
        for part, named, mult in (
            ("backbone", self.backbone_named_parameters(), backbone_lr_mult),
            ("head", self.head_named_parameters(), 1.0),
        ):
            named = list(named)
            for decay in (True, False):
                params = [p for n, p in named if is_no_decay(n, p) != decay]
                if params:
                    groups.append({"name": f"{part}{'' if decay else '_no_decay'}", "params": params,
                                   "lr": lr * mult, "weight_decay": weight_decay if decay else 0.0})
        return groups

    # ------------------------------------------------------------------ config / I/O
    def portable_config(self) -> ModelConfig:
        """The config with backbone paths replaced by their full configs (self-contained)."""
        image = dataclasses.replace(
            self.config.image, pretrained=None, backbone_config=_hf_config_dict(self.image_encoder.backbone)
        )
        text = dataclasses.replace(
            self.config.text, pretrained=None, backbone_config=_hf_config_dict(self.text_encoder.backbone)
        )
        return dataclasses.replace(self.config, image=image, text=text)

    def config_hash(self) -> str:
        """Stable hash of the portable config (pairs a model with the index built from it)."""
        return config_hash(self.portable_config())

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None, text_settings: dict | None = None) -> None:
        """Write config.json (with the text settings), model.safetensors (and the tokenizer files), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            _save_tokenizer_atomically(tokenizer, directory)
        tensors, aliases = _dedup_state_dict(self.state_dict())
        atomic_save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "aliases": json.dumps(aliases)})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config_hash": self.config_hash(),
                "config": to_dict(self.portable_config())}
        text = text_settings if text_settings is not None else self.text_settings
        if text is not None:
            meta["text"] = text
        atomic_write_json(directory / CONFIG_NAME, meta)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Text4VPR":
        """Rebuild a model written by `save_pretrained`, bit-exactly; no network access."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise MissingInputError(f"{cfg_path} not found: not a text4vpr model folder")
        try:
            meta = json.loads(cfg_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise InputValueError(f"{cfg_path}: unreadable ({e}): not a text4vpr model folder") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise InputValueError(f"{cfg_path}: not a text4vpr config (format={found!r})")
        model = cls(from_dict(ModelConfig, meta["config"]))
        model.text_settings = meta.get("text")  # checked where it is used (data.text_settings.from_record)
        weights = directory / WEIGHTS_NAME
        state = load_file(str(weights), device=str(map_location))
        with safe_open(str(weights), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        for dup, orig in aliases.items():
            state[dup] = state[orig]
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Text4VPR:
    return Text4VPR.from_pretrained(directory, map_location)


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases, layer scales and scalars (tau) take no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias")


def _is_backbone(name: str) -> bool:
    return name.startswith(("image_encoder.backbone.", "text_encoder.backbone."))


def _keep_rows(view_mask, lead, n, device) -> torch.Tensor | None:
    """Flattened view mask (N,), or None when every view is present."""
    if view_mask is None:
        return None
    keep = view_mask.to(device=device, dtype=torch.bool).reshape(-1)
    if keep.shape[0] != n:
        raise ValueError(f"view_mask shape {tuple(view_mask.shape)} does not match images {tuple(lead)}")
    return None if bool(keep.all()) else keep


def _hf_config_dict(backbone: nn.Module) -> dict:
    d = backbone.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        d.pop(key, None)
    return json.loads(json.dumps(d))  # plain JSON types only


def _dedup_state_dict(state: dict) -> tuple[dict, dict]:
    """Contiguous copies with tied tensors (same storage) stored once; returns (tensors, aliases)."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _save_tokenizer_atomically(tokenizer: Any, directory: Path) -> None:
    """Save into a temp folder beside `directory`, then move each file into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
