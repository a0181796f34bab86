"""Fused Triton kernel: group-similarity scores and a running top-k, never the (Q, N) matrix.

Grid: (query blocks, database splits). One program owns BQ queries and a contiguous range of
database tiles. Per tile it computes the (BQ, BN) group scores on the tensor cores (tl.dot,
half inputs with fp32 accumulate; fp32 inputs use tf32 or IEEE like torch's matmul setting)
as one GEMM over the flattened V*D axis: the per-view query weights (masks, cosine norms)
are folded into the queries on the host, the database is used in place when it is already
"prepared" (zeros for missing views; unit views in cosine mode: what the index stores), and
any-heading runs the V rotated query copies against the same database tile. Each query keeps
its running top-k (KP >= k slots, fp32 scores + int32 ids) in registers; the tile is
compared once against the running k-th best (score, id) and only surviving candidates enter
the insertion loop, so after the first tiles almost every score is rejected by that single
compare. Each program writes its (BQ, k) unsorted result; the host merges the splits
(S * Q * k entries) with the shared tie rule.

Splitting the database over programs keeps the GPU busy when Q is small; extra memory is
S * Q * k * 8 bytes (plus a cleaned database copy only for an unprepared database).
k <= 128 (the caller falls back to torch above). Compiles for sm_90 without register spills
at the default blocks (checked with an offline compile; not yet timed on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from text4vpr.kernels.common import (
    MAX_TRITON_K,
    check_finite,
    check_inputs,
    check_mode,
    merge_topk,
    rotated_views,
    view_scales,
)

_MODE_IDS = {"upstream": 0, "cosine": 1, "any-heading": 2}
_SENTINEL = 2**31 - 1  # empty slots hold ids _SENTINEL - slot: unique, worse than any real id


@triton.jit
def _tile_scores(
    q_ptr, d_ptr, offs_q, q_ok, offs_n, n_ok, K_DIM, stride_qq, stride_dn,
    BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    """(BQ, BN) fp32 = q[offs_q] @ d[offs_n]^T over the flattened V*D axis (one pipelined loop)."""
    offs_k = tl.arange(0, BK)
    a_ptrs = q_ptr + offs_q.to(tl.int64)[:, None] * stride_qq + offs_k[None, :]  # (BQ, BK)
    b_ptrs = d_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_k[None, :]  # (BN, BK)
    acc = tl.zeros((BQ, BN), dtype=tl.float32)
    for k0 in range(0, K_DIM, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=q_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K_DIM
            a = tl.load(a_ptrs, mask=q_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BK
        b_ptrs += BK
    return acc


@triton.jit
def _group_topk_kernel(
    q_ptr, d_ptr, qbits_ptr, dbits_ptr, out_s_ptr, out_i_ptr,
    Q, N, K_DIM, K, tiles_per_split, stride_qr, stride_qq, stride_dn,
    MODE: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    KP: tl.constexpr, PRECISION: tl.constexpr, SENTINEL: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    q_ok = offs_q < Q
    cols = tl.arange(0, KP)

    # running top-k: slots < K start empty (-inf, unique sentinel id); pad slots >= K hold +inf
    # so they are never the worst and never replaced.
    top_s = tl.where(cols[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BQ, KP), tl.float32)
    top_i = (SENTINEL - cols)[None, :] + tl.zeros((BQ, KP), tl.int32)
    worst = tl.min(top_s, axis=1)  # (BQ,) k-th best score so far
    worst_id = tl.max(tl.where(top_s == worst[:, None], top_i, -1), axis=1)  # its id (largest among ties)
    if MODE == 1:
        qbits = tl.load(qbits_ptr + offs_q, mask=q_ok, other=0)  # (BQ,) view-presence bits

    n_tiles = tl.cdiv(N, BN)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        s = _tile_scores(q_ptr, d_ptr, offs_q, q_ok, offs_n, n_ok, K_DIM, stride_qq, stride_dn,
                         BQ, BN, BK, PRECISION, EVEN_K)
        if MODE == 2:  # any-heading: best of the V cyclic rotations (rotated query copies), fused
            for r in range(1, V):
                sr = _tile_scores(q_ptr + r * stride_qr, d_ptr, offs_q, q_ok, offs_n, n_ok, K_DIM,
                                  stride_qq, stride_dn, BQ, BN, BK, PRECISION, EVEN_K)
                s = tl.maximum(s, sr)
        if MODE == 1:  # cosine: mean over the views present in both
            both = qbits[:, None] & tl.load(dbits_ptr + offs_n, mask=n_ok, other=0)[None, :]
            count = tl.zeros((BQ, BN), tl.int32)
            for v in tl.static_range(V):
                count += (both >> v) & 1
            s = s / tl.maximum(count, 1).to(tl.float32)

        # one compare against the running k-th best rejects almost every score
        ids = offs_n[None, :]
        valid = q_ok[:, None] & n_ok[None, :]
        live = valid & ((s > worst[:, None]) | ((s == worst[:, None]) & (ids < worst_id[:, None])))
        n_live = tl.sum(live.to(tl.int32))
        while n_live > 0:
            # best live candidate per row (score desc, id asc) replaces the row's worst slot
            cand = tl.where(live, s, float("-inf"))
            best = tl.max(cand, axis=1)
            best_id = tl.min(tl.where(live & (cand == best[:, None]), ids, SENTINEL), axis=1)
            has = best_id < SENTINEL
            slot = (top_s == worst[:, None]) & (top_i == worst_id[:, None]) & has[:, None]
            top_s = tl.where(slot, best[:, None], top_s)
            top_i = tl.where(slot, best_id[:, None], top_i)
            worst = tl.min(top_s, axis=1)
            worst_id = tl.max(tl.where(top_s == worst[:, None], top_i, -1), axis=1)
            live = live & (ids != best_id[:, None])
            live = live & ((s > worst[:, None]) | ((s == worst[:, None]) & (ids < worst_id[:, None])))
            n_live = tl.sum(live.to(tl.int32))

    out = pid_s.to(tl.int64) * Q * K + offs_q.to(tl.int64)[:, None] * K + cols[None, :]
    keep = q_ok[:, None] & (cols[None, :] < K)
    tl.store(out_s_ptr + out, top_s, mask=keep)
    tl.store(out_i_ptr + out, top_i, mask=keep)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_UNIT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _is_prepared(db: torch.Tensor, mask: torch.Tensor, mode: str) -> bool:
    """Missing views are zero and, in cosine mode, present views are unit vectors (to rounding)."""
    if not bool(mask.all()) and bool((db[~mask] != 0).any()):
        return False
    if mode == "cosine":
        norms = torch.linalg.vector_norm(db, dim=-1, dtype=torch.float32)[mask]
        if norms.numel() and float((norms - 1).abs().max()) > _UNIT_TOL.get(db.dtype, 1e-5):
            return False
    return True


def prepare_database(database: torch.Tensor, db_mask: torch.Tensor, mode: str, rows: int = 8192) -> torch.Tensor:
    """(N, V*D) database for the kernel: used in place when already prepared (the index stores
    zeros for missing views and unit image vectors), else a cleaned copy (zeroed / normalised)."""
    n = database.shape[0]
    chunks = range(0, n, rows)
    if all(_is_prepared(database[s : s + rows], db_mask[s : s + rows], mode) for s in chunks):
        return database.reshape(n, -1)
    out = torch.empty(n, database.shape[1] * database.shape[2], dtype=database.dtype, device=database.device)
    for s in chunks:
        part = database[s : s + rows]
        scale = view_scales(part, db_mask[s : s + rows], mode)  # (C, V)
        out[s : s + rows] = (part.float() * scale[..., None]).reshape(part.shape[0], -1).to(database.dtype)
    return out


def _view_bits(mask: torch.Tensor) -> torch.Tensor:
    """(M, V) bool -> (M,) int32 with bit v set when view v is present."""
    weights = 2 ** torch.arange(mask.shape[1], device=mask.device, dtype=torch.int32)
    return (mask.to(torch.int32) * weights).sum(1, dtype=torch.int32)


def _default_blocks(interpreting: bool) -> tuple[int, int, int]:
    """(BQ, BN, BK). GPU: 64x64x64 with 8 warps, 4 stages compiles for sm_90 with no
    register spills at k <= 64 (a few bytes at k = 128); larger tiles spill."""
    if interpreting:
        return 16, 32, 16
    return 64, 64, 64


def _num_splits(q_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Database splits so that q_blocks * splits fills the GPU about twice."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, -(-2 * sms // q_blocks)))


def group_topk_triton(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    database: torch.Tensor,
    db_mask: torch.Tensor | None,
    k: int,
    mode: str = "upstream",
    *,
    block_q: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `group_topk_torch` (modes, tie rule, (Q, min(k, N)) outputs), via the fused kernel.

    Queries are cast to the database dtype (bf16 databases run the tensor cores); scores are
    accumulated and selected in fp32. Block sizes and splits default to H100/H200 choices.
    """
    check_mode(mode)
    query_mask, db_mask = check_inputs(queries, query_mask, database, db_mask, k)
    if k > MAX_TRITON_K:
        raise ValueError(f"the Triton kernel supports k <= {MAX_TRITON_K}; use the torch path")
    check_finite(queries, "queries")
    check_finite(database, "database")
    num_q, num_v, dim = queries.shape
    n = database.shape[0]
    kk = min(k, n)
    dev = database.device
    if num_q == 0 or n == 0:
        return torch.zeros(num_q, kk, device=dev), torch.zeros(num_q, kk, dtype=torch.int64, device=dev)

    interpreting = _interpreting()
    bq, bn, bk = _default_blocks(interpreting)
    bq, bn, bk = block_q or bq, block_n or bn, block_k or bk
    query_mask, db_mask = query_mask.to(dev), db_mask.to(dev)
    qs = view_scales(queries.to(dev), query_mask, mode)  # (Q, V)
    q = queries.to(device=dev, dtype=torch.float32) * qs[..., None]  # (Q, V, D)
    q = rotated_views(q, mode).reshape(-1, num_q, num_v * dim).to(database.dtype).contiguous()  # (R, Q, V*D)
    db = prepare_database(database, db_mask, mode)  # (N, V*D)
    if db.stride(1) != 1:
        db = db.contiguous()
    qbits, dbits = _view_bits(query_mask), _view_bits(db_mask)

    q_blocks, n_tiles = triton.cdiv(num_q, bq), triton.cdiv(n, bn)
    n_splits = splits or _num_splits(q_blocks, n_tiles, dev)
    tiles_per_split = triton.cdiv(n_tiles, min(n_splits, n_tiles))
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    out_s = torch.empty(n_splits, num_q, kk, dtype=torch.float32, device=dev)
    out_i = torch.empty(n_splits, num_q, kk, dtype=torch.int32, device=dev)
    fp32_ieee = database.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if interpreting or fp32_ieee else "tf32"
    launch = {} if interpreting else {"num_warps": num_warps or 8, "num_stages": num_stages or 4}
    _group_topk_kernel[(q_blocks, n_splits)](
        q, db, qbits, dbits, out_s, out_i,
        num_q, n, num_v * dim, kk, tiles_per_split, q.stride(0), q.stride(1), db.stride(0),
        MODE=_MODE_IDS[mode], V=num_v, BQ=bq, BN=bn, BK=bk, KP=max(16, triton.next_power_of_2(kk)),
        PRECISION=precision, SENTINEL=_SENTINEL, EVEN_K=(num_v * dim) % bk == 0, **launch,
    )
    scores = out_s.permute(1, 0, 2).reshape(num_q, n_splits * kk)  # (Q, S*k)
    ids = out_i.permute(1, 0, 2).reshape(num_q, n_splits * kk).to(torch.int64)
    return merge_topk(scores, ids, kk)
