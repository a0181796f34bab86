"""Image normalisation shared by the loader (float32 batches) and the model (uint8 batches).

docs/method.md#pixels: resize to 252x252, scale to [0, 1], normalise with the ImageNet mean and std. The
loader can ship uint8 pixels (`LoaderConfig.image_dtype="uint8"`, 4x fewer bytes through
worker queues and host-to-device copies) and leave this step to the device; the float32
loader path calls the same function on the whole (B, V, 3, H, W) batch, so both give
bit-identical float32 results on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x / 255 - mean) / std as x * scale + bias in float32: two separately rounded ops (not an
# FMA), so CPU and CUDA give the same bits.
_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float32))  # (3,)
_BIAS = -torch.tensor(IMAGENET_MEAN, dtype=torch.float32) / torch.tensor(IMAGENET_STD, dtype=torch.float32)  # (3,)
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_HUGE = 1 << 22  # bytes from which CPU outputs are numpy-allocated (numpy asks for transparent huge pages)


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():  # traced, the cache lookup would be a guard: a recompile once filled
        return _SCALE.view(3, 1, 1).to(device), _BIAS.view(3, 1, 1).to(device)  # (3, 1, 1)
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (_SCALE.view(3, 1, 1).to(device), _BIAS.view(3, 1, 1).to(device))  # (3, 1, 1)
    return _CONSTANTS[device]


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; large ones are allocated by numpy, which madvises huge
    pages (torch's allocator does not by default), so first-touch page faults stay cheap."""
    numel = math.prod(shape)  # not np.prod: a graph break under torch.compile
    if numel * torch.empty((), dtype=dtype).element_size() < _HUGE:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def normalize_images(images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels (..., 3, H, W) -> float32 ImageNet-normalised (docs/method.md#pixels), a new tensor on the same device.

    `images` is uint8 in [0, 255] (the loader's `image_dtype="uint8"` batches) or a floating
    tensor holding the same 0-255 pixel values (not [0, 1]); the result is
    `(x / 255 - mean) / std`, computed in float32. With `view_mask` (the leading dims of
    `images`, e.g. (B, V)), views where it is False are set to exactly 0, as in the loader's
    float32 batches. On the loader's uint8 batches this reproduces its float32 batches bit
    for bit (do not fuse it into an FMA, e.g. via torch.compile, if bits matter).
    """
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) images, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    scale, bias = _constants(images.device)
    shape = tuple(images.shape)
    out = empty_cpu(shape, torch.float32) if images.device.type == "cpu" else torch.empty(shape, dtype=torch.float32, device=images.device)
    out.copy_(images)  # exact for uint8; rounds float64 to float32
    out.mul_(scale).add_(bias)
    if view_mask is not None:
        if tuple(view_mask.shape) != shape[:-3]:
            raise ValueError(f"view_mask shape {tuple(view_mask.shape)} does not match images {shape}")
        missing = ~view_mask.to(device=images.device, dtype=torch.bool)
        # on the CPU skip the pass when nothing is missing; on a device avoid the host sync
        if images.device.type != "cpu" or bool(missing.any()):
            out.masked_fill_(missing[..., None, None, None], 0.0)  # (..., 1, 1, 1) broadcast
    return out
