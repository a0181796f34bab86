"""What an evaluation retrieved for each query: the ranked database rows with their scores,
and the location ids and coordinates needed to explain a hit or a miss (the HTML report)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Ranking:
    """Per-query search results; rows of `ids` index the database arrays."""

    query_index: torch.Tensor  # (Q,) int64 location index of each query
    query_coords: torch.Tensor  # (Q, 3) float64 ECEF metres
    db_index: torch.Tensor  # (N,) int64 location index of each database row
    db_coords: torch.Tensor  # (N, 3) float64 ECEF metres
    scores: torch.Tensor  # (Q, K) group similarity, best first
    ids: torch.Tensor  # (Q, K) int64 database rows, best first (ties: lower location index)

    def distances(self) -> np.ndarray:
        """(Q, K) float64 metres from each query's true position to each retrieved location."""
        q = self.query_coords.numpy().astype(np.float64)
        db = self.db_coords.numpy().astype(np.float64)
        return np.linalg.norm(db[self.ids.numpy()] - q[:, None, :], axis=-1)

    def true_ranks(self) -> np.ndarray:
        """(Q,) 1-based rank of each query's own location among its K results; 0 when not among them."""
        own = self.db_index.numpy()[self.ids.numpy()] == self.query_index.numpy()[:, None]  # (Q, K)
        if own.shape[1] == 0:
            return np.zeros(own.shape[0], dtype=np.int64)
        return np.where(own.any(axis=1), own.argmax(axis=1) + 1, 0)

    def true_margins(self) -> np.ndarray:
        """(Q,) float64 score of the first result minus that of the query's own location (0 when it
        is first; NaN when it is not among the K results)."""
        ranks = self.true_ranks()
        s = self.scores.numpy().astype(np.float64)  # (Q, K)
        if s.shape[1] == 0:
            return np.full(len(ranks), np.nan)
        own = np.take_along_axis(s, np.maximum(ranks, 1)[:, None] - 1, axis=1)[:, 0]
        return np.where(ranks > 0, s[:, 0] - own, np.nan)


@dataclass
class Evaluation:
    """What `evaluate` and `search_metrics` return (the same on every rank)."""

    metrics: dict  # {"accuracy": {k: {r: fraction}}, "num_queries", "num_database", "mode", "ks", "radii"}
    ranking: Ranking  # what each query retrieved (per_query.jsonl, the HTML report)
