"""Approximate group top-k: FAISS candidates, then an exact re-rank with the full vectors.

Per part: the query views are weighted as the exact path scores them (the mask; 1/||t_v||
in cosine mode), concatenated, and searched in the part's FAISS index (HNSW or IVF) for `rerank` candidates
(`any-heading`: each of the V rotated queries, candidates pooled). The candidates' full
vectors are read from the part file (pread of those rows only), scored with the exact formula of
`kernels/common.py`, and the top k kept under the exact tie rule (score, then lower location
index when the indices are unique, else lower row: `search.ranks_by_location`).
Parts and ranks merge like the exact sharded search (`search.merge_across_ranks`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from text4vpr.kernels.common import SearchInputError, check_inputs, check_mode, merge_topk, rotated_views, view_scales
from text4vpr.retrieval.search import _PAD_ID, merge_across_ranks, pad_topk

_ROWS_PER_BATCH = 2048  # candidate rows read per query batch: (2048, V, D) fp32 = 64 MB at V*D = 8192


def weighted_views(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(M, V, D) fp32 views times their weight in the score (mask; unit length in cosine)."""
    return x.float() * view_scales(x, mask, mode)[..., None]


def candidate_scores(q: torch.Tensor, q_mask: torch.Tensor, rows: torch.Tensor, rows_mask: torch.Tensor,
                     mode: str) -> torch.Tensor:
    """Exact scores (Q, C) of each query against its own candidate rows (Q, C, V, D), masks (Q, C, V)."""
    num_q, c, v, d = rows.shape
    rot = rotated_views(weighted_views(q, q_mask, mode), mode)  # (R, Q, V, D)
    weights = view_scales(rows.view(-1, v, d), rows_mask.view(-1, v), mode).view(num_q, c, v, 1)  # (Q, C, V, 1)
    if not bool((weights == 1).all()):  # missing views or cosine: weight the rows' views
        rows = rows * weights
    q_cols = rot.reshape(rot.shape[0], num_q, v * d).permute(1, 2, 0)  # (Q, V*D, R)
    scores = torch.bmm(rows.reshape(num_q, c, v * d), q_cols).amax(dim=-1)  # (Q, C): best rotation
    if mode == "cosine":
        common = (q_mask[:, None, :] & rows_mask).sum(-1).float()  # (Q, C) views in both
        scores = scores / common.clamp_min(1.0)
    return scores


def _dedupe(cand: torch.Tensor) -> torch.Tensor:
    """(Q, C) candidate rows sorted per query, repeats (from several rotations) set to -1."""
    cand = torch.sort(cand, dim=1).values
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat[:, 1:] = cand[:, 1:] == cand[:, :-1]
    return cand.masked_fill(repeat, -1)


def _faiss_candidates(part, flat: np.ndarray, rerank: int, nprobe: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(M, rerank) FAISS candidates (-1 where the search ran short), among `rows` when given."""
    import faiss

    if rows is not None and len(rows) <= rerank:  # a group smaller than the list: all of it
        return torch.cat([rows, torch.full((rerank - len(rows),), -1)]).expand(flat.shape[0], -1)
    sel = None if rows is None else faiss.IDSelectorBatch(rows.numpy())
    params = part.search_params(max(nprobe, rerank) if part.kind == "hnsw" else nprobe, sel)  # efSearch >= rerank
    return torch.from_numpy(part.faiss.search(flat, rerank, params=params)[1])


def _grouped_candidates(part, flat: np.ndarray, rerank: int, nprobe: int, groups) -> torch.Tensor:
    return torch.cat([_faiss_candidates(part, flat, rerank, nprobe, rows) for rows in groups], 1)


def _candidates_by_breadth(part, flat: np.ndarray, rerank: int, breadth: torch.Tensor, groups) -> torch.Tensor:
    """FAISS candidates of each flat row at its own breadth (one call per distinct breadth)."""
    values = torch.unique(breadth).tolist()
    if len(values) == 1:
        return _grouped_candidates(part, flat, rerank, values[0], groups)
    found = torch.empty(flat.shape[0], len(groups) * rerank, dtype=torch.int64)
    for b in values:
        rows = (breadth == b).nonzero().flatten()
        found[rows] = _grouped_candidates(part, flat[rows.numpy()], rerank, b, groups)
    return found


def part_candidates(part, q: torch.Tensor, q_mask: torch.Tensor, k: int, mode: str, breadth: torch.Tensor,
                    rerank: int) -> torch.Tensor:
    """(Q, C) candidate rows of one part (local ids, -1 = none), at least min(k, n) real each.

    cosine divides by the views a query and a row share, which an inner product cannot hold:
    there each view-mask pattern of the rows gets its own candidates (the divisor is constant
    within a pattern, so the coarse order there is the numerator's)."""
    n, num_q = len(part), q.shape[0]
    if n <= rerank:  # the part is smaller than the candidate list: every row
        return torch.arange(n).expand(num_q, n)
    rot = rotated_views(weighted_views(q, q_mask, mode), mode)  # (R, Q, V, D)
    flat = np.ascontiguousarray(rot.reshape(rot.shape[0] * num_q, -1).numpy())  # (R*Q, V*D)
    groups = part.mask_groups() if mode == "cosine" else [None]
    found = _candidates_by_breadth(part, flat, rerank, breadth.repeat(rot.shape[0]), groups)  # (R*Q, G*rerank)
    short = ((found >= 0).sum(1) < min(k, n)).nonzero().flatten()
    if short.numel():  # the search held too few rows (lists probed, filtered graph): search them all
        found[short] = _grouped_candidates(part, flat[short.numpy()], rerank, part.widest, groups)
    cand = found.view(rot.shape[0], num_q, -1).transpose(0, 1).reshape(num_q, -1)  # (Q, R*G*rerank)
    return _dedupe(cand) if rot.shape[0] > 1 else cand


def _part_topk(part, q, q_mask, k, mode, breadth, rerank, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, tie-rule ids) of one part's top k: location indices (`keys`) or global rows."""
    cand = part_candidates(part, q, q_mask, k, mode, breadth, rerank)  # (Q, C)
    safe = cand.clamp_min(0)
    rows = part.rows.rows(safe.flatten().numpy()).view(*cand.shape, *part.rows.shape[1:])  # (Q, C, V, D)
    scores = candidate_scores(q, q_mask, rows, part.view_mask[safe], mode)
    real = cand >= 0
    if not bool(torch.isfinite(scores[real]).all()):
        raise SearchInputError("queries or database contain non-finite values (NaN or inf)")
    scores = scores.masked_fill(~real, float("-inf"))
    rows = cand + part.offset
    ids = torch.where(real, rows if keys is None else keys[rows.clamp_min(0)], torch.full_like(cand, _PAD_ID))
    return merge_topk(scores, ids, min(k, ids.shape[1]))


def query_breadth(index, query_mask: torch.Tensor, nprobe: int | None = None) -> torch.Tensor:
    """(Q,) search breadth per query: `nprobe` when given, else the index's tuned one for queries
    with every view and its (wider) one for partial-view queries."""
    if nprobe:
        return torch.full((query_mask.shape[0],), int(nprobe))
    return torch.where(query_mask.all(1), index.nprobe, index.nprobe_partial)


def _local_topk(index, queries, query_mask, k: int, mode: str, nprobe: int | None,
                rerank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, tie-rule ids) (Q, k) over the parts this process holds, padded (-inf, _PAD_ID)."""
    check_mode(mode)
    queries = queries.detach().cpu().float()
    v, d = index.header["views"], index.header["embed_dim"]
    query_mask, _ = check_inputs(queries, None if query_mask is None else query_mask.cpu(), torch.zeros(0, v, d), None, k)
    rerank, keys = max(rerank or index.rerank, k), index.tie_keys()
    breadth = query_breadth(index, query_mask, nprobe)  # (Q,)
    step = max(1, _ROWS_PER_BATCH // ((v if mode == "any-heading" else 1) * rerank))
    out_s, out_i = [torch.zeros(0, k)], [torch.zeros(0, k, dtype=torch.int64)]
    for s in range(0, queries.shape[0], step):
        q, qm, b = queries[s : s + step], query_mask[s : s + step], breadth[s : s + step]
        found = [pad_topk(*_part_topk(p, q, qm, k, mode, b, rerank, keys), k) for p in index.parts]
        found = found or [pad_topk(torch.zeros(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.int64), k)]
        scores, ids = merge_topk(torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1), k)
        out_s.append(scores)
        out_i.append(ids)
    for p in index.parts:
        p.rows.release()  # the re-rank reads leave the resident set
    return torch.cat(out_s), torch.cat(out_i)


def _to_rows(index, ids: torch.Tensor) -> torch.Tensor:
    """Tie-rule ids -> global rows (padding stays _PAD_ID)."""
    keys = index.tie_keys()
    if keys is None:
        return ids
    sorted_keys, rows = index.sorted_keys()
    pos = torch.searchsorted(sorted_keys, ids.clamp(max=int(sorted_keys[-1]))) if len(keys) else ids
    return torch.where(ids == _PAD_ID, ids, rows[pos] if len(keys) else ids)


def approx_topk(index, queries: torch.Tensor, query_mask: torch.Tensor | None, k: int, mode: str = "upstream", *,
                nprobe: int | None = None, rerank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the parts this process holds: (scores (Q, k) fp32, global rows (Q, k) int64), equal
    scores ranked as the exact path ranks them; padded with (-inf, _PAD_ID) where fewer rows exist
    here; no collective."""
    scores, ids = _local_topk(index, queries, query_mask, k, mode, nprobe, rerank)
    return scores, _to_rows(index, ids)


def sharded_approx_topk(index, queries, query_mask, k: int, mode: str = "upstream", *, group=None, nprobe=None,
                        rerank=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top min(k, N) over every rank's parts (identical on all ranks; queries the same everywhere)."""
    scores, ids = _local_topk(index, queries, query_mask, k, mode, nprobe, rerank)
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        scores, ids = scores.cuda(), ids.cuda()  # NCCL gathers CUDA tensors only
    scores, ids = merge_across_ranks(scores, ids, k, len(index), group)
    return scores, _to_rows(index, ids.cpu()).to(ids.device)


def searcher(index):
    """`sharded_group_topk`'s signature over the approximate index (what `evaluate` calls)."""
    def search(queries, query_mask, database, db_mask, k, mode="upstream", **_):
        return sharded_approx_topk(index, queries, query_mask, k, mode)
    return search
