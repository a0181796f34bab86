"""DINOv2 position embeddings resized exactly as the DINOv2 hub code does, cached per grid.

The published method ran the torch.hub DINOv2 model, which resizes its (1 + M*M, C) table
for another grid with `interpolate(scale_factor=((h + 0.1) / M, (w + 0.1) / M),
mode="bicubic", antialias=False)` in float32 (`interpolate_offset = 0.1`), and returns the
table untouched when the grid is already M x M. transformers' `Dinov2Model` resizes with
`size=(h, w)` instead, which samples other points (at 252 px: 7e-5 on image embeddings of
0.06), so our image encoder uses this module, not the backbone's own resize.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2 `interpolate_offset` of the hub models


def hub_resize(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + M*M, C) table -> (1, 1 + h*w, C) for a (h, w) patch grid, as the hub code does."""
    n = table.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table of {n} patch positions is not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return table
    patch = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, C, M, M)
    scale = ((h + INTERPOLATE_OFFSET) / m, (w + INTERPOLATE_OFFSET) / m)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)  # (1, C, h, w)
    if patch.shape[-2:] != (h, w):
        raise ValueError(f"hub resize of a {m}x{m} table gave {tuple(patch.shape[-2:])}, wanted {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, h*w, C)
    return torch.cat((table[:, :1].float(), patch), dim=1).to(table.dtype)


class HubPositionEmbedding:
    """`hub_resize` of one parameter, computed once per grid and reused.

    A cached entry is valid while the parameter is unchanged: keyed on its in-place version
    counter, storage, device and dtype, so an optimizer step, `load_state_dict`, `.to()` or
    `.data =` recomputes it. When the table takes gradients (requires_grad under grad mode),
    the call is being traced by torch.compile, or the table is an inference tensor (made
    under `torch.inference_mode`, so it has no version counter), it is recomputed every
    call instead, so autograd, compiled graphs and in-place changes see the real computation.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[tuple, torch.Tensor]] = {}

    def __call__(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if (table.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling() or table.is_inference():
            return hub_resize(table, grid)
        key = (table._version, table.data_ptr(), table.device, table.dtype, tuple(table.shape))
        hit = self._cache.get(grid)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            out = hub_resize(table, grid)
        self._cache[grid] = (key, out)
        return out

    def __deepcopy__(self, memo) -> "HubPositionEmbedding":
        return HubPositionEmbedding()  # a copy's table is a new tensor: start with no entries
