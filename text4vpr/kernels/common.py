"""What the search paths share (torch in `topk.py`, Triton in `group_topk_triton.py`): the
similarity modes, the tie-rule keys, input checks and per-view weights.

Tie rule, everywhere (torch, Triton, sharded merge): higher score first, then lower
location id. Selection runs on fp32 scores. The rule is made exact by sorting on a 64-bit
key (order-preserving int32 image of the fp32 score, then the complemented id), so the
result never depends on `torch.topk`'s internal order for equal values.

Modes (masks: `query_mask` (Q, V), `db_mask` (N, V); True = view present):

- ``upstream`` -- the published score (docs/method.md#group-similarity): raw vectors, views aligned by pos,
  ``s(q, n) = sum_v m_qv * m_nv * <t_qv, i_nv>``. A view missing in the query or in the
  location contributes 0 (so a partial query is scored on the views it has).
- ``cosine`` -- per-view cosine averaged over the views present in both:
  ``s(q, n) = sum_v m_qv m_nv cos(t_qv, i_nv) / max(1, sum_v m_qv m_nv)``. Removes
  upstream's weighting of each view by the text-vector norm ||t_v||. A pair with no view in
  common scores 0. Zero vectors have cosine 0 with everything.
- ``any-heading`` -- the upstream score maximised over the V cyclic rotations of the view
  alignment: ``s(q, n) = max_r sum_v m_qv m_n,(v+r)%V <t_qv, i_n,(v+r)%V>``, for a user who
  knows the four descriptions go round the panorama in order but not which way the first
  one faces. Costs V times the upstream work.
"""

from __future__ import annotations

import torch

from text4vpr.kernels import MODES
from text4vpr.utils.errors import InputError

MAX_TRITON_K = 128
ID_LIMIT = 2**31 - 1 - 2 * MAX_TRITON_K  # ids must fit the 32-bit key field (and kernel sentinels)
_LOW32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- tie-rule keys


def encode_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (score desc, id asc) as plain descending int order.

    High 32 bits: order-preserving int32 image of the fp32 score (-0.0 folded onto +0.0);
    low 32 bits: ``2**32 - 1 - id``. Requires finite-or-inf scores (no NaN) and 0 <= id < 2**32.
    """
    s = scores.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = s.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    return (ordered.to(torch.int64) << 32) | (_LOW32 - ids.to(torch.int64))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode_keys`: (scores fp32, ids int64)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    ids = _LOW32 - (keys & _LOW32)
    return bits.view(torch.float32), ids


def merge_keys(blocks: list[torch.Tensor], k: int, sorted: bool = True) -> torch.Tensor:
    """The one merge of top-k lists: the best min(k, M) of key blocks (Q, m_i), M = sum m_i, by
    the tie rule (keys are unique, so the result never depends on topk's order for equal values)."""
    keys = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)  # (Q, M)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=sorted).values


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of candidate lists (Q, M) under the tie rule; returns (Q, min(k, M)) sorted."""
    return decode_keys(merge_keys([encode_keys(scores, ids)], k))


# ----------------------------------------------------------------------------- input checks


class SearchInputError(InputError, ValueError):
    """Vectors, masks, k or mode a search cannot take (from the user's files or flags)."""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SearchInputError(f"unknown similarity mode {mode!r}; expected one of {', '.join(MODES)}")


def check_finite(x: torch.Tensor, name: str, rows_per_chunk: int = 4096) -> None:
    """Raise SearchInputError if `x` holds NaN or inf. One fp32 sum per row chunk: NaN and inf always
    reach the sum (a false alarm needs sums beyond 3e38, i.e. broken vectors anyway)."""
    for start in range(0, x.shape[0], rows_per_chunk):
        if not bool(torch.isfinite(x[start : start + rows_per_chunk].sum(dtype=torch.float32))):
            raise SearchInputError(f"{name} contains non-finite values (NaN or inf)")


def check_inputs(queries, query_mask, database, db_mask, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return boolean masks (all-True where None was given)."""
    if queries.dim() != 3 or database.dim() != 3:
        raise SearchInputError(
            f"queries and database must be (Q, V, D) and (N, V, D), got {tuple(queries.shape)} "
            f"and {tuple(database.shape)}"
        )
    if queries.shape[1:] != database.shape[1:]:
        raise SearchInputError(
            f"query groups {tuple(queries.shape[1:])} and database groups "
            f"{tuple(database.shape[1:])} differ in (V, D)"
        )
    if not isinstance(k, int) or k < 1:
        raise SearchInputError(f"k must be a positive int, got {k!r}")
    if database.shape[0] > ID_LIMIT:
        raise SearchInputError(f"database has {database.shape[0]} rows; at most {ID_LIMIT} supported")
    masks = []
    for name, x, m in (("query_mask", queries, query_mask), ("db_mask", database, db_mask)):
        if m is None:
            m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if tuple(m.shape) != tuple(x.shape[:2]):
            raise SearchInputError(f"{name} must be {tuple(x.shape[:2])}, got {tuple(m.shape)}")
        masks.append(m.to(device=x.device, dtype=torch.bool))
    return masks[0], masks[1]


def view_scales(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(M, V) fp32 per-view weights: the mask, times 1/||x_v|| in cosine mode (0 for zero vectors)."""
    scale = mask.to(torch.float32)
    if mode == "cosine":
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (M, V), no fp32 copy of x
        scale = scale * torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return scale


def rotated_views(x: torch.Tensor, mode: str) -> torch.Tensor:
    """any-heading: (V, Q, ...) where [r][:, u] = x[:, (u - r) % V]; otherwise (1, Q, ...)."""
    if mode != "any-heading":
        return x.unsqueeze(0)
    return torch.stack([torch.roll(x, shifts=r, dims=1) for r in range(x.shape[1])])
