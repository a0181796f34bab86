"""The DeepSpeed config additions the trainer needs: torch bf16 autocast inside the engine.

launch/deepspeed_zero2.json keeps DeepSpeed's own bf16 off (it would cast the whole model,
Sinkhorn and BatchNorm included). The trainer then runs the forward under torch.autocast,
but DeepSpeed's engine (0.19) switches an outer CUDA autocast *off* inside its forward unless
its config has a `torch_autocast` section: without this, a bf16 run is silently fp32 on GPU.
"""

from __future__ import annotations


def torch_autocast_section(mixed_precision: str) -> dict | None:
    """The `torch_autocast` section for train.mixed_precision, or None (no autocast wanted).

    No `lower_precision_safe_modules`: gradients are reduced in fp32, as on DDP.
    """
    if mixed_precision != "bf16":
        return None
    return {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def add_torch_autocast(ds_config: dict, mixed_precision: str) -> bool:
    """Add the section to a DeepSpeed config dict in place, unless the user wrote one or turned
    on DeepSpeed's own bf16/fp16 (two mixed-precision schemes must not stack). Returns whether
    it was added."""
    section = torch_autocast_section(mixed_precision)
    own = any(str(ds_config.get(k, {}).get("enabled", False)).lower() == "true" for k in ("bf16", "fp16"))
    if section is None or own or "torch_autocast" in ds_config:
        return False
    ds_config["torch_autocast"] = section
    return True
