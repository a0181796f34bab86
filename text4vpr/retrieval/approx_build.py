"""`build_approximate`: the approximate index of an exact index folder, built rank by rank,
tuned on held-out queries, recorded in the header (docs/retrieval.md#approximate-index)."""

from __future__ import annotations

from pathlib import Path

import torch

from text4vpr.kernels.common import MODES
from text4vpr.retrieval.approx_index import (
    ApproxConfig, build_part_faiss, part_view_mask, rank_parts, write_part_faiss, write_section,
)
from text4vpr.retrieval.approx_load import load_approx_index
from text4vpr.retrieval.approx_tune import held_out_queries, tune_nprobe
from text4vpr.retrieval.index import RetrievalIndexError, read_header
from text4vpr.retrieval.part_rows import PartFormatError, PartRows
from text4vpr.utils.errors import InputError


def build_approximate(index_dir: str | Path, cfg: ApproxConfig, *, tune_queries: torch.Tensor | None = None,
                      tune_mask: torch.Tensor | None = None, target_recall: float | None = None,
                      tune_modes: tuple[str, ...] | None = None) -> dict:
    """Add the approximate index to an exact index folder: each rank builds the FAISS file of its
    parts (`rank_parts`), rank 0 writes the header section, tuning nprobe on the given held-out
    queries when `target_recall` is set. Returns the header."""
    from text4vpr.utils.distributed import distributed_world, raise_together

    rank, world = distributed_world()
    index_dir = Path(index_dir)
    parts = read_header(index_dir)["parts"]
    records, error = [], None
    try:
        for i in rank_parts(len(parts), rank, world):
            if parts[i]["count"]:
                records.append(_build_part(index_dir, i, parts[i]["name"], cfg))
    except InputError as e:  # on every rank: one rank raising alone would leave the others in the gather
        error = e
    raise_together(error)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = sorted((r for g in gathered for r in g), key=lambda r: r["part"])
    header = {}
    if rank == 0:
        header = write_section(index_dir, cfg, records)
        if target_recall is not None and tune_queries is not None:
            header = write_section(index_dir, cfg, records, _tune(index_dir, tune_queries, tune_mask, target_recall,
                                                                  tune_modes))
    if world > 1:
        torch.distributed.barrier()
    return header if rank == 0 else read_header(index_dir)


def _build_part(index_dir: Path, i: int, name: str, cfg: ApproxConfig) -> dict:
    file = index_dir / name
    try:
        rows = PartRows(file)
    except (PartFormatError, OSError) as e:
        raise RetrievalIndexError(f"{file}: unreadable index part ({e})") from None
    index, params = build_part_faiss(rows, part_view_mask(file), cfg)
    rows.close()
    return write_part_faiss(index_dir, i, index, params)


def _tune(index_dir, queries, mask, target, modes) -> dict:
    approx = load_approx_index(index_dir)
    try:
        return tune_nprobe(approx, *held_out_queries(queries, mask), target, modes=tuple(modes or MODES))
    finally:
        approx.close()
