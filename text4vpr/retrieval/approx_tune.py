"""Recall of the approximate search against the exact one, and the build-time choice of the
search breadth (IVF lists probed, HNSW efSearch): the smallest power of two whose recall of the
exact top-k reaches the target on held-out queries, in every mode asked (docs/retrieval.md#approximate-index)."""

from __future__ import annotations

import torch

from text4vpr.kernels.common import MODES, merge_topk
from text4vpr.kernels.topk import group_topk
from text4vpr.retrieval.approx_search import approx_topk

HNSW_MAX_EF = 4096  # tuning stops here for a graph: wider is a scan of most of it


def exact_topk(index, queries: torch.Tensor, query_mask: torch.Tensor | None, k: int, mode: str = "upstream",
               chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path over the memory-mapped parts held here, `chunk` rows at a time (global rows)."""
    best = None
    for part in index.parts:
        for start in range(0, len(part), chunk):
            rows = slice(start, min(len(part), start + chunk))
            s, i = group_topk(queries.float(), query_mask, part.rows.rows(rows), part.view_mask[rows], k, mode,
                              backend="torch")
            i = i + part.offset + start
            best = (s, i) if best is None else merge_topk(torch.cat([best[0], s], 1), torch.cat([best[1], i], 1), k)
        part.rows.release()
    if best is None:
        return torch.zeros(queries.shape[0], 0), torch.zeros(queries.shape[0], 0, dtype=torch.int64)
    return best


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over queries of the fraction of the exact top-k ids (truth (Q, k)) found (Q, k')."""
    if truth.numel() == 0:
        return 1.0
    hits = (found[:, :, None] == truth[:, None, :]).any(dim=1).float()  # (Q, k)
    return float(hits.mean())


def held_out_queries(queries: torch.Tensor, query_mask: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries twice: as given, and with a random non-empty subset of their views (partial-view queries)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(query_mask.shape, generator=g) < 0.5
    keep[torch.arange(keep.shape[0]), torch.randint(keep.shape[1], (keep.shape[0],), generator=g)] = True
    partial = query_mask & keep
    partial = torch.where(partial.any(1, keepdim=True), partial, query_mask)  # a query keeps one of its views
    return torch.cat([queries, queries * partial[..., None]]), torch.cat([query_mask, partial])


def _first_breadth(index, queries, query_mask, truth: dict, target: float, k: int, top: int) -> tuple[int, dict]:
    """Smallest power-of-two breadth (capped at `top`) whose recall reaches `target` in every mode."""
    breadth = 1
    while True:
        measured = {m: recall(approx_topk(index, queries, query_mask, k, m, nprobe=breadth)[1], t) for m, t in truth.items()}
        if min(measured.values()) >= target or breadth >= top:
            return breadth, measured
        breadth = min(2 * breadth, top)


def tune_nprobe(index, queries: torch.Tensor, query_mask: torch.Tensor, target: float, k: int = 10,
                modes: tuple[str, ...] = MODES) -> dict:
    """The breadth (up to the widest: every list, or efSearch HNSW_MAX_EF) for queries with every view,
    and apart for partial-view queries, each the smallest power of two whose recall of the exact top-k
    reaches `target` in every mode; returns {nprobe, nprobe_partial, recall {mode: r} (all queries at
    those breadths), recall_full, recall_partial, target, k, queries, reached}."""
    query_mask = query_mask.bool()
    truth = {m: exact_topk(index, queries, query_mask, k, m)[1] for m in modes}
    top = max((min(p.widest, HNSW_MAX_EF) for p in index.parts), default=1)
    full = query_mask.all(1)
    chosen, measured = {}, {}
    for name, rows in (("full", full), ("partial", ~full)):
        if bool(rows.any()):
            sub = {m: t[rows] for m, t in truth.items()}
            chosen[name], measured[name] = _first_breadth(index, queries[rows], query_mask[rows], sub, target, k, top)
    nprobe = chosen.get("full") or chosen.get("partial", 1)
    partial = chosen.get("partial", nprobe)
    index.nprobe, index.nprobe_partial = nprobe, partial
    overall = {m: recall(approx_topk(index, queries, query_mask, k, m)[1], t) for m, t in truth.items()}
    return {"nprobe": nprobe, "nprobe_partial": partial, "recall": {m: round(r, 5) for m, r in overall.items()},
            **{f"recall_{n}": {m: round(r, 5) for m, r in got.items()} for n, got in measured.items()},
            "target": target, "k": k, "queries": int(queries.shape[0]),
            "reached": min(min(g.values()) for g in measured.values()) >= target if measured else True}
