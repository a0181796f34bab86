"""Group-similarity top-k search: the torch reference path and the backend dispatch.

A query is a group of V text vectors (one per view, pos order), a database location a
group of V image vectors. `group_topk` returns, per query, the k best locations under one
of three similarity modes, never materialising the full (Q, N) score matrix: the database
is walked in chunks, each chunk's top-k is merged into a running top-k.

Modes, tie rule and input checks: `common.py`.
"""

from __future__ import annotations

import torch

from text4vpr.kernels.common import (
    MAX_TRITON_K, SearchInputError, check_inputs, check_mode, decode_keys, encode_keys, merge_keys, rotated_views,
    view_scales,
)

# ----------------------------------------------------------------------------- torch path


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, C) with fp32 output; half inputs keep tensor cores on CUDA. A reused
    `out` buffer (fp32 inputs) spares a fresh allocation and its page faults per chunk."""
    if a.dtype == torch.float32:
        if out is not None and out.shape == (a.shape[0], b.shape[1]):
            return torch.mm(a, b, out=out)
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _auto_chunk(rows: int, k: int, budget_bytes: int) -> int:
    """Database rows per chunk so the (rows, C) scores + keys stay within the budget."""
    per_col = max(rows, 1) * (4 + 8 + 8)  # fp32 scores, int64 keys, topk workspace
    return max(k, 256, budget_bytes // per_col)


def _chunk_topk_keys(scores: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """Tie-rule top-k keys of one (Q, C) score chunk whose first column is database row `start`.

    Fast path: float top-(k+1); when every row's (k+1)-th score is strictly below the others
    there is no tie at the boundary and only those k get keys. Otherwise the chunk is keyed
    whole. NaN and +inf sort first in torch.topk, so checking the selected values catches them.
    """
    num_q, c = scores.shape
    ids = None
    if k < c:
        vals, idx = torch.topk(scores, k + 1, dim=1, sorted=False)  # (Q, k+1)
        if not bool(torch.isfinite(vals).all()):
            raise SearchInputError("queries or database contain non-finite values (NaN or inf)")
        low, pos = vals.min(dim=1, keepdim=True)  # the (k+1)-th score
        if bool(((vals == low).sum(dim=1) == 1).all()):  # strictly below the k-th: no boundary tie
            keep = torch.ones_like(vals, dtype=torch.bool).scatter_(1, pos, False)
            return encode_keys(vals[keep].view(num_q, k), idx[keep].view(num_q, k) + start)
    elif not bool(torch.isfinite(scores).all()):
        raise SearchInputError("queries or database contain non-finite values (NaN or inf)")
    ids = torch.arange(start, start + c, device=scores.device).expand(num_q, -1)
    return torch.topk(encode_keys(scores, ids), min(k, c), dim=1, sorted=False).values


def group_topk_torch(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    database: torch.Tensor,
    db_mask: torch.Tensor | None,
    k: int,
    mode: str = "upstream",
    *,
    chunk_size: int | None = None,
    memory_budget: int = 512 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: chunked matmul over the database, per-chunk top-k, running merge.

    Returns (scores (Q, min(k, N)) fp32, ids (Q, min(k, N)) int64), sorted by the tie rule.
    Extra memory: one chunk's (Q*R, C) scores and keys (R = V rotations in any-heading).
    A non-finite query or database value raises when it reaches a selected score (NaN and
    +inf always do; a NaN query component makes its whole row NaN). `retrieval.index.load_index`
    and `retrieval.evaluate` check whole databases up front.
    """
    check_mode(mode)
    query_mask, db_mask = check_inputs(queries, query_mask, database, db_mask, k)
    # non-finite queries or database values are caught in the selected scores (_chunk_topk_keys)
    num_q, num_v, _ = queries.shape
    n = database.shape[0]
    kk = min(k, n)
    dev = queries.device
    if num_q == 0 or n == 0:
        return torch.zeros(num_q, kk, device=dev), torch.zeros(num_q, kk, dtype=torch.int64, device=dev)

    compute_dtype = database.dtype if (database.is_cuda and database.dtype in (torch.bfloat16, torch.float16)) else torch.float32
    qs = view_scales(queries, query_mask, mode)  # (Q, V)
    if mode == "cosine" or not bool(query_mask.all()):
        q = (queries.to(torch.float32) * qs[..., None]).to(compute_dtype)  # (Q, V, D) weighted views
    else:
        q = queries.to(compute_dtype)
    q_rot = rotated_views(q, mode).reshape(-1, num_v * queries.shape[2])  # (R*Q, V*D)
    rotations = num_v if mode == "any-heading" else 1
    unit_db = mode != "cosine" and bool(db_mask.all())

    chunk = chunk_size or _auto_chunk(num_q * rotations, k, memory_budget)
    run_keys = None
    buf = torch.empty(q_rot.shape[0], min(chunk, n), device=dev) if compute_dtype == torch.float32 else None
    for start in range(0, n, chunk):
        db = database[start : start + chunk]  # (C, V, D)
        ds = view_scales(db, db_mask[start : start + chunk], mode)  # (C, V)
        if unit_db:
            dbc = db.to(compute_dtype)
        else:
            dbc = (db.to(torch.float32) * ds[..., None]).to(compute_dtype)
        scores = _matmul_fp32(q_rot, dbc.reshape(db.shape[0], -1).T, buf)  # (R*Q, C)
        scores = scores.view(rotations, num_q, -1)  # (R, Q, C)
        if mode == "cosine":
            count = query_mask.to(torch.float32) @ db_mask[start : start + chunk].to(torch.float32).T  # (Q, C)
            scores = scores / count.clamp_min(1.0)
        scores = scores[0] if rotations == 1 else scores.amax(dim=0)  # (Q, C)
        keys = _chunk_topk_keys(scores, start, kk)  # (Q, <= k)
        run_keys = keys if run_keys is None else merge_keys([run_keys, keys], kk, sorted=False)  # (Q, <= k)
    return decode_keys(merge_keys([run_keys], kk))


# ----------------------------------------------------------------------------- dispatch


def group_topk(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    database: torch.Tensor,
    db_mask: torch.Tensor | None,
    k: int,
    mode: str = "upstream",
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k database locations per query group: (scores (Q, min(k,N)) fp32, ids int64).

    queries (Q, V, D), database (N, V, D); masks (Q, V) / (N, V) bool or None (all present).
    backend: "auto" (Triton on CUDA tensors with k <= 128, torch otherwise), "torch", or
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1; k > 128 falls back to torch).
    Extra keyword arguments go to the chosen backend (e.g. chunk_size, block sizes).
    """
    check_mode(mode)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and queries.is_cuda and database.is_cuda)
    if use_triton and k <= MAX_TRITON_K:
        from text4vpr.kernels.group_topk_triton import group_topk_triton

        return group_topk_triton(queries, query_mask, database, db_mask, k, mode, **kwargs)
    kwargs = {key: v for key, v in kwargs.items() if key in ("chunk_size", "memory_budget")}
    return group_topk_torch(queries, query_mask, database, db_mask, k, mode, **kwargs)
