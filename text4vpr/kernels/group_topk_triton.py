"""Fused Triton kernel: group-similarity scores and a running top-k, never the (Q, N) matrix.

Grid: (query blocks, database splits). One program owns BQ queries and a contiguous range of
database tiles. Per tile it computes the (BQ, BN) group scores on the tensor cores (tl.dot,
half inputs with fp32 accumulate; fp32 inputs use tf32 or IEEE like torch's matmul setting),
one accumulator per view so the per-view weights (masks, cosine norms) are applied without
copying the database. Each query keeps its running top-k (KP >= k slots, fp32 scores + int32
ids) in registers; the tile is compared once against the running k-th best (score, id) and
only surviving candidates enter the insertion loop, so after the first tiles almost every
score is rejected by that single compare. Each program writes its (BQ, k) unsorted result;
the host merges the splits (S * Q * k entries) with the shared tie rule.

Splitting the database over programs keeps the GPU busy when Q is small; extra memory is
S * Q * k * 8 bytes. k <= 128 (the caller falls back to torch above).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from text4vpr.kernels.topk import (
    MAX_TRITON_K,
    _check_inputs,
    check_finite,
    check_mode,
    merge_topk,
    view_scales,
)

_MODE_IDS = {"upstream": 0, "cosine": 1, "any-heading": 2}
_SENTINEL = 2**31 - 1  # empty slots hold ids _SENTINEL - slot: unique, worse than any real id


@triton.jit
def _view_pair_scores(
    q_ptr, qs_ptr, d_ptr, ds_ptr, offs_q, q_ok, offs_n, n_ok, D,
    stride_qq, stride_qv, stride_dn, stride_dv,
    ROT: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BQ, BN) fp32: sum_v qs[q, v-ROT] * ds[n, v] * <q_(v-ROT), d_v>, and the view-overlap count."""
    acc = tl.zeros((BQ, BN), dtype=tl.float32)
    count = tl.zeros((BQ, BN), dtype=tl.float32)
    q_rows = offs_q.to(tl.int64) * stride_qq
    d_rows = offs_n.to(tl.int64) * stride_dn
    for v in tl.static_range(V):
        qv = (v - ROT + V) % V  # query view aligned with database view v under rotation ROT
        part = tl.zeros((BQ, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < D
            a = tl.load(
                q_ptr + q_rows[:, None] + qv * stride_qv + offs_k[None, :],
                mask=q_ok[:, None] & k_ok[None, :], other=0.0,
            )  # (BQ, BK)
            b = tl.load(
                d_ptr + d_rows[:, None] + v * stride_dv + offs_k[None, :],
                mask=n_ok[:, None] & k_ok[None, :], other=0.0,
            )  # (BN, BK)
            part = tl.dot(a, tl.trans(b), part, input_precision=PRECISION)
        qsv = tl.load(qs_ptr + offs_q * V + qv, mask=q_ok, other=0.0)  # (BQ,)
        dsv = tl.load(ds_ptr + offs_n.to(tl.int64) * V + v, mask=n_ok, other=0.0)  # (BN,)
        acc += part * qsv[:, None] * dsv[None, :]
        count += ((qsv[:, None] != 0.0) & (dsv[None, :] != 0.0)).to(tl.float32)
    return acc, count


@triton.jit
def _group_topk_kernel(
    q_ptr, qs_ptr, d_ptr, ds_ptr, out_s_ptr, out_i_ptr,
    Q, N, D, K, tiles_per_split,
    stride_qq, stride_qv, stride_dn, stride_dv,
    MODE: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    KP: tl.constexpr, PRECISION: tl.constexpr, SENTINEL: tl.constexpr,
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

    n_tiles = tl.cdiv(N, BN)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        if MODE == 2:  # any-heading: best of the V cyclic rotations, fused
            s = tl.full((BQ, BN), float("-inf"), tl.float32)
            for r in tl.static_range(V):
                sr, _ = _view_pair_scores(
                    q_ptr, qs_ptr, d_ptr, ds_ptr, offs_q, q_ok, offs_n, n_ok, D,
                    stride_qq, stride_qv, stride_dn, stride_dv, r, V, BQ, BN, BK, PRECISION,
                )
                s = tl.maximum(s, sr)
        else:
            s, count = _view_pair_scores(
                q_ptr, qs_ptr, d_ptr, ds_ptr, offs_q, q_ok, offs_n, n_ok, D,
                stride_qq, stride_qv, stride_dn, stride_dv, 0, V, BQ, BN, BK, PRECISION,
            )
            if MODE == 1:  # cosine: mean over the views present in both
                s = s / tl.maximum(count, 1.0)

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


def _db_scales(database: torch.Tensor, db_mask: torch.Tensor, mode: str, rows: int = 65536) -> torch.Tensor:
    """(N, V) fp32 view weights, computed in row chunks (no fp32 copy of the database)."""
    parts = [view_scales(database[s : s + rows], db_mask[s : s + rows], mode) for s in range(0, database.shape[0], rows)]
    return torch.cat(parts) if parts else torch.zeros(0, database.shape[1], device=database.device)


def _default_blocks(k: int, interpreting: bool) -> tuple[int, int, int]:
    if interpreting:
        return 16, 32, 16
    return (64, 128, 64) if k <= 32 else (64, 64, 64)


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
    query_mask, db_mask = _check_inputs(queries, query_mask, database, db_mask, k)
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
    bq, bn, bk = _default_blocks(kk, interpreting)
    bq, bn, bk = block_q or bq, block_n or bn, block_k or bk
    q = queries.to(device=dev, dtype=database.dtype).contiguous()
    db = database if database.stride(2) == 1 else database.contiguous()
    qs = view_scales(queries, query_mask, mode).to(dev).contiguous()  # (Q, V)
    ds = _db_scales(db, db_mask.to(dev), mode).contiguous()  # (N, V)

    q_blocks, n_tiles = triton.cdiv(num_q, bq), triton.cdiv(n, bn)
    n_splits = splits or _num_splits(q_blocks, n_tiles, dev)
    tiles_per_split = triton.cdiv(n_tiles, min(n_splits, n_tiles))
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    out_s = torch.empty(n_splits, num_q, kk, dtype=torch.float32, device=dev)
    out_i = torch.empty(n_splits, num_q, kk, dtype=torch.int32, device=dev)
    if interpreting or database.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    else:
        precision = "tf32"
    extra = {}
    if num_warps or not interpreting:
        extra["num_warps"] = num_warps or 8
    if num_stages or not interpreting:
        extra["num_stages"] = num_stages or 3
    _group_topk_kernel[(q_blocks, n_splits)](
        q, qs, db, ds, out_s, out_i,
        num_q, n, dim, kk, tiles_per_split,
        q.stride(0), q.stride(1), db.stride(0), db.stride(1),
        MODE=_MODE_IDS[mode], V=num_v, BQ=bq, BN=bn, BK=bk,
        KP=max(16, triton.next_power_of_2(kk)), PRECISION=precision, SENTINEL=_SENTINEL,
        **extra,
    )
    scores = out_s.permute(1, 0, 2).reshape(num_q, n_splits * kk)  # (Q, S*k)
    ids = out_i.permute(1, 0, 2).reshape(num_q, n_splits * kk).to(torch.int64)
    return merge_topk(scores, ids, kk)
