"""Sharded search: each rank holds a slice of the database, every rank sees all queries.

Each rank runs `group_topk` on its slice, maps local rows to global ids (`id_offset` +
row), and ONE all-gather of the (Q, k) results merges them under the shared tie rule
(higher score, then lower global id) into exactly the single-process answer.

Merge cost: each rank sends its (Q, k) top-k packed as int64 keys (fp32 score and 32-bit
id in one word): Q*k*8 bytes per rank (Q*k*12 with separate fp32 scores and int64 ids),
so every rank receives R*Q*k*8 bytes for R ranks and merges R*k candidates per query. It
grows linearly with the number of ranks and does not depend on the database size; at
16,384 queries, k = 100 and 64 ranks that is 13 MB sent and 839 MB received per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from text4vpr.kernels.common import ID_LIMIT, decode_keys, encode_keys, merge_keys
from text4vpr.kernels.topk import group_topk

_PAD_ID = 2**32 - 1  # padding entries: score -inf, largest id -> always last


def pad_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (Q, k') results to (Q, k) with (-inf, _PAD_ID) entries that lose every comparison."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    q = scores.shape[0]
    pad_s = torch.full((q, missing), float("-inf"), dtype=scores.dtype, device=scores.device)
    pad_i = torch.full((q, missing), _PAD_ID, dtype=ids.dtype, device=ids.device)
    return torch.cat([scores, pad_s], 1), torch.cat([ids, pad_i], 1)


def merge_gathered(keys: list[torch.Tensor], k: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank (Q, k) key blocks into the global top min(k, total)."""
    return decode_keys(merge_keys(keys, min(k, total)))


def sharded_group_topk(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    database: torch.Tensor,
    db_mask: torch.Tensor | None,
    k: int,
    mode: str = "upstream",
    *,
    id_offset: int,
    total: int,
    group=None,
    backend: str = "auto",
    key_ids: torch.Tensor | None = None,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over the union of every rank's database slice (identical on all ranks).

    queries (Q, V, D) must be the same on every rank (see `broadcast_queries`); `database`
    (n_local, V, D) may be empty; `id_offset` is this slice's first global id and `total`
    the database size over all ranks. Without a process group this is plain `group_topk`.
    `key_ids` (n_local,), ascending: the ids the rows are ranked (ties) and returned by, e.g.
    location indices; default: the global row, id_offset + local row. `gather=False`: this
    slice's top-k alone (pass `total` = its rows), even inside a process group.
    """
    scores, ids = group_topk(queries, query_mask, database, db_mask, k, mode, backend=backend)
    ids = ids + id_offset if key_ids is None else key_ids.to(ids.device)[ids]  # local rows -> ids
    return merge_across_ranks(scores, ids, k, total, group, gather)


def merge_across_ranks(scores: torch.Tensor, ids: torch.Tensor, k: int, total: int, group=None, gather: bool = True):
    """Every rank's (Q, <=k) top-k with global ids -> the global top min(k, total), on all ranks
    (`gather=False`: this rank's alone)."""
    scores, ids = pad_topk(scores, ids, k)
    keys = encode_keys(scores, ids)  # (Q, k) int64: one word per entry
    if not gather or not (dist.is_available() and dist.is_initialized()):
        return merge_gathered([keys], k, total)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(gathered, keys.contiguous(), group=group)
    return merge_gathered(gathered, k, total)


def ranks_by_location(db_ids: torch.Tensor) -> bool:
    """Whether ties can be broken by location index: the ids are unique and fit the tie-rule keys
    (the same verdict on every rank: every rank holds all of them). Otherwise: by row."""
    return bool(db_ids.numel() and db_ids.min() >= 0 and db_ids.max() < ID_LIMIT
                and torch.unique(db_ids).numel() == db_ids.numel())


def slice_in_location_order(database, db_mask, db_ids: torch.Tensor, id_offset: int):
    """This rank's slice with its rows in ascending location index (copied only when they are not:
    the search breaks ties by row), its mask, and those location indices."""
    local = db_ids[id_offset: id_offset + database.shape[0]].cpu()
    if bool((local[1:] > local[:-1]).all()):
        return database, db_mask, local
    order = torch.sort(local).indices
    mask = None if db_mask is None else db_mask[order.to(db_mask.device)]
    return database[order.to(database.device)], mask, local[order]


def sharded_topk_by_location(queries, query_mask, database, db_mask, k: int, mode: str = "upstream", *,
                             db_ids: torch.Tensor | None, id_offset: int, total: int, backend: str = "auto",
                             gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`sharded_group_topk` whose equal scores rank the lower location index first (`db_ids` (N,),
    every row's location index); returns (scores, global rows). Without unique ids: by row."""
    if db_ids is None or not ranks_by_location(db_ids):
        return sharded_group_topk(queries, query_mask, database, db_mask, k, mode, id_offset=id_offset, total=total,
                                  backend=backend, gather=gather)
    database, db_mask, key_ids = slice_in_location_order(database, db_mask, db_ids, id_offset)
    scores, top = sharded_group_topk(queries, query_mask, database, db_mask, k, mode, id_offset=id_offset,
                                     total=total, backend=backend, key_ids=key_ids, gather=gather)
    sorted_ids, rows = torch.sort(db_ids.cpu())
    return scores, rows[torch.searchsorted(sorted_ids, top.cpu())].to(top.device)  # location ids -> rows


def broadcast_queries(queries: torch.Tensor | None, query_mask: torch.Tensor | None, src: int = 0, group=None):
    """Send rank `src`'s (Q, V, D) queries and (Q, V) mask to every rank (others pass None)."""
    if not (dist.is_available() and dist.is_initialized()):
        return queries, query_mask
    meta = [None]
    if dist.get_rank() == src:
        meta = [(tuple(queries.shape), queries.dtype, str(queries.device))]
    dist.broadcast_object_list(meta, src=src, group=group)
    shape, dtype, _ = meta[0]
    device = queries.device if queries is not None else _default_device()
    if dist.get_rank() != src:
        queries = torch.empty(shape, dtype=dtype, device=device)
        query_mask = torch.empty(shape[:2], dtype=torch.bool, device=device)
    elif query_mask is None:
        query_mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    dist.broadcast(queries, src=src, group=group)
    dist.broadcast(query_mask, src=src, group=group)
    return queries, query_mask


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
