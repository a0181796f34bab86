"""`per_query.jsonl`: what an evaluation retrieved for each query, one JSON object a line
(the metrics table can be recomputed from it; docs/retrieval.md lists the fields)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from text4vpr.retrieval.ranking import Ranking
from text4vpr.utils.atomic import atomic_write_text

PER_QUERY_JSONL = "per_query.jsonl"


def per_query_records(ranking: Ranking, flags: dict[int, list[str]] | None = None) -> list[dict]:
    """One record per query, in the ranking's query order; `flags` by location index (the shard
    build's data report, `thumbnails.shard_flags`)."""
    dist, ranks, margins = ranking.distances(), ranking.true_ranks(), ranking.true_margins()
    top = ranking.db_index.numpy()[ranking.ids.numpy()]  # (Q, K) location ids
    flags = flags or {}
    out = []
    for q, index in enumerate(ranking.query_index.tolist()):
        out.append({
            "query": index,  # the query's (true) location index
            "true_ecef": ranking.query_coords[q].tolist(),
            "top_ids": top[q].tolist(),
            "scores": ranking.scores[q].tolist(),
            "distances_m": dist[q].tolist(),
            "true_rank": int(ranks[q]) or None,  # None: the true location is not among the K results
            "margin": None if math.isnan(margins[q]) else float(margins[q]),  # top-1 score - true location's
            "flags": list(flags.get(index, [])),
        })
    return out


def write_per_query(path: str | Path, ranking: Ranking, flags: dict[int, list[str]] | None = None) -> Path:
    """Write `per_query_records` as JSON lines (atomically)."""
    path = Path(path)
    lines = [json.dumps(r) for r in per_query_records(ranking, flags)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path
