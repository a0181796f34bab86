"""Evaluation: encode a split, search every location's texts against every location's images,
score top-k within r metres (docs/method.md#accuracy-within-r-metres). Used by `text4vpr eval` and by the trainer's validation.

Distributed (torch.distributed initialised): each rank encodes the locations its eval loader
yields (every location exactly once over all ranks: no drop_last, nothing repeated), with no
collective per batch. At the end, one all-gather of the (small) query vectors and
coordinates, a local search of all queries against this rank's database slice, and one
all-gather of the (Q, k) results (`search.sharded_group_topk`). Every rank returns the same
`Evaluation` (metrics and ranking).
"""

from __future__ import annotations

from typing import Sequence

import torch

from text4vpr.data.street360loc import NUM_VIEWS
from text4vpr.kernels.common import check_finite, check_mode
from text4vpr.retrieval.index import rank_rows
from text4vpr.retrieval.defaults import KS, RADII
from text4vpr.retrieval.metrics import topk_within_radius
from text4vpr.retrieval.ranking import Evaluation, Ranking
from text4vpr.retrieval.search import sharded_topk_by_location
from text4vpr.utils.distributed import Deferred, distributed_world
from text4vpr.utils.progress import progress
from text4vpr.utils.errors import InputError, InputValueError


class DisjointQueriesError(InputError, ValueError):
    """Query locations are missing from the index's database (an index of another split?)."""


@torch.no_grad()
def encode_split(model, loader, device=None, images: bool = True, show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Text (queries) and image (database) vectors of every location this rank's loader yields, on CPU.
    `images=False` skips the image tower (the database then comes from an index)."""
    model = getattr(model, "module", model)  # DDP / Accelerate wrapper -> the Text4VPR model
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list] = {k: [] for k in ("queries", "query_mask", "database", "db_mask", "coords", "index")}
    batches = Deferred(progress(loader, "encode", show_progress))  # a read error: raised on every rank below
    try:
        for batch in batches:
            view_mask = batch["view_mask"].bool()
            text = model.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, V, D)
            out["queries"].append(text.float().cpu())
            out["query_mask"].append(view_mask & batch["attention_mask"].bool().any(-1))
            if images:
                img = model.encode_images(batch["images"].to(device), view_mask.to(device))  # (B, V, D)
                out["database"].append(img.float().cpu())
                out["db_mask"].append(view_mask)
            out["coords"].append(batch["coords"].to(torch.float64))
            out["index"].append(batch["index"].to(torch.int64))
    finally:
        model.train(was_training)
    batches.settle()
    if not out["queries"]:  # this rank saw no location: empty tensors of the right shapes
        d, v = model.embed_dim, NUM_VIEWS
        out = {"queries": [torch.zeros(0, v, d)], "query_mask": [torch.zeros(0, v, dtype=torch.bool)],
               "database": [torch.zeros(0, v, d)], "db_mask": [torch.zeros(0, v, dtype=torch.bool)],
               "coords": [torch.zeros(0, 3, dtype=torch.float64)], "index": [torch.zeros(0, dtype=torch.int64)]}
    if not images:
        del out["database"], out["db_mask"]
    return {k: torch.cat(v) for k, v in out.items()}


def _rank_slice(index) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's equal share of an index: (embeddings, view masks, first row), from a fully
    loaded index or one loaded with exactly these rows (`load_index(..., rows=rank_rows(...))`)."""
    rank, world = distributed_world()
    lo, hi = rank_rows(len(index), rank, world)
    held_lo, held_hi = index.rows
    if (held_lo, held_hi) == (0, len(index)):
        return index.embeddings[lo:hi], index.view_mask[lo:hi], lo
    if (held_lo, held_hi) != (lo, hi):
        raise InputValueError(f"the index holds rows {held_lo}..{held_hi}; rank {rank} of {world} searches rows {lo}..{hi}")
    return index.embeddings, index.view_mask, lo


def _check_finite_everywhere(database: torch.Tensor) -> None:
    """Raise on every rank when any rank's database slice is non-finite (a rank raising
    alone would leave the others waiting in the result gather)."""
    ok = torch.tensor([1 if bool(torch.isfinite(database).all()) else 0])
    _, world = distributed_world()
    if world > 1:
        if torch.distributed.get_backend() == "nccl":
            ok = ok.cuda()
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if int(ok.item()) == 0:
        check_finite(database, "database vectors")  # names this rank's problem when it is here
        raise InputValueError("database vectors contain non-finite values (NaN or inf) on another rank")


def check_queries_in_database(query_ids: torch.Tensor, db_ids: torch.Tensor) -> None:
    """Raise DisjointQueriesError naming how many query locations the database lacks (same
    verdict on every rank: both id lists are complete on each)."""
    missing = query_ids[~torch.isin(query_ids, db_ids)]
    if missing.numel():
        raise DisjointQueriesError(
            f"{missing.numel()} of {query_ids.numel()} query locations are not in the index's database "
            f"(e.g. location {int(missing.min())}): the index holds other locations (another split?); rebuild it "
            "from these shards, or pass --allow-disjoint to score them anyway"
        )


def gather_queries(local: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """All ranks' queries, masks and coords in rank order, and this rank's first global id."""
    rank, world = distributed_world()
    if world == 1:
        return local, 0
    mine = {k: local[k].cpu() for k in ("queries", "query_mask", "coords", "index")}
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    offset = sum(len(g["index"]) for g in gathered[:rank])
    return {k: torch.cat([g[k] for g in gathered]) for k in mine}, offset


def search_metrics(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    query_coords: torch.Tensor,
    database: torch.Tensor,
    db_mask: torch.Tensor | None,
    db_coords: torch.Tensor,
    ks: Sequence[int] = KS,
    radii: Sequence[float] = RADII,
    mode: str = "upstream",
    *,
    id_offset: int = 0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    search=None,
) -> Evaluation:
    """Metrics and `Ranking` for precomputed vectors. `database`/`db_mask` are this rank's slice
    (rows from `id_offset`); `db_coords` covers the whole database; queries are the same on every
    rank. `ids` = (query location ids (Q,), database location ids (N,)); None: row numbers.
    Equal scores rank the lower location index first (the lower row when ids repeat).
    `search`: a replacement of `sharded_topk_by_location` (same arguments; the approximate index's)."""
    check_mode(mode)
    check_finite(queries, "query vectors")
    _check_finite_everywhere(database)
    device = torch.device(device) if device is not None else database.device
    k = max(ks)
    total = db_coords.shape[0]
    scores, top = (search or sharded_topk_by_location)(
        queries.to(device), None if query_mask is None else query_mask.to(device),
        database.to(device), None if db_mask is None else db_mask.to(device),
        k, mode, db_ids=None if ids is None else ids[1], id_offset=id_offset, total=total, backend=backend,
    )
    accuracy = topk_within_radius(top.cpu(), query_coords, db_coords, ks, radii)
    metrics = {"accuracy": accuracy, "num_queries": int(queries.shape[0]), "num_database": int(total), "mode": mode,
               "ks": [int(x) for x in ks], "radii": [float(r) for r in radii]}
    if ids is None:
        ids = torch.arange(queries.shape[0]), torch.arange(total)
    ranking = Ranking(ids[0].cpu(), query_coords.cpu(), ids[1].cpu(), db_coords.cpu(), scores.float().cpu(), top.cpu())
    return Evaluation(metrics, ranking)


def evaluate(
    model,
    loader,
    ks: Sequence[int] = KS,
    radii: Sequence[float] = RADII,
    mode: str = "upstream",
    *,
    index=None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    show_progress: bool = False,
    allow_disjoint: bool = False,
) -> Evaluation:
    """Encode the loader's split and return its `Evaluation` (same on every rank): the metrics
    {"accuracy": {k: {r: fraction}}, "num_queries", "num_database", "mode", "ks", "radii"} and
    the `Ranking` (what each query retrieved).

    Queries = each location's descriptions, database = each location's images (docs/method.md#database-and-query-vectors);
    with `index` (a loaded `retrieval.index.Index`), the database comes from it instead
    (each rank searches an equal slice of its rows), and every query location must be in it
    unless `allow_disjoint`. The model is left in its train/eval state.
    """
    check_mode(mode)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    local = encode_split(model, loader, device, images=index is None, show_progress=show_progress)
    everyone, offset = gather_queries(local)
    if everyone["queries"].shape[0] == 0:
        raise InputValueError("the evaluation loader yielded no locations")
    search = None
    if getattr(index, "approximate", False):  # FAISS candidates, exact re-rank (retrieval/approx_search.py)
        from text4vpr.retrieval.approx_search import searcher

        search = searcher(index)
    if index is None:
        database, db_mask, db_coords, db_ids = local["database"], local["db_mask"], everyone["coords"], everyone["index"]
    else:
        if not allow_disjoint:
            check_queries_in_database(everyone["index"], index.index)
        database, db_mask, offset = _rank_slice(index) if search is None else _no_rows(index)
        db_coords, db_ids = index.coords, index.index
    return search_metrics(
        everyone["queries"], everyone["query_mask"], everyone["coords"], database, db_mask, db_coords,
        ks, radii, mode, id_offset=offset, backend=backend, device=device,
        ids=(everyone["index"], db_ids), search=search,
    )


def _no_rows(index) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An empty slice: the approximate index reads its rows itself."""
    v, d = index.header["views"], index.header["embed_dim"]
    return torch.zeros(0, v, d), torch.zeros(0, v, dtype=torch.bool), 0
