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
    ids: torch.Tensor  # (Q, K) int64 database rows, best first (ties: lower row)

    def distances(self) -> np.ndarray:
        """(Q, K) float64 metres from each query's true position to each retrieved location."""
        q = self.query_coords.numpy().astype(np.float64)
        db = self.db_coords.numpy().astype(np.float64)
        return np.linalg.norm(db[self.ids.numpy()] - q[:, None, :], axis=-1)
