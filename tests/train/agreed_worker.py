"""2-rank worker (torchrun) for test_agreed_batches.py: `agreed_batches` over fake loaders whose
batches keep a random number of their share (0 = every sample skipped); writes what each rank
yielded and printed (agreed-<rank>.json)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

PER, STEPS = 3, 40  # samples per rank's share, global batches


def kept_table(world: int, seed: int = 0) -> np.ndarray:
    """(STEPS, world) samples each rank keeps of its share; about a quarter of the shares empty."""
    rng = np.random.default_rng([seed, world])
    kept = rng.integers(1, PER + 1, size=(STEPS, world))
    kept[rng.random((STEPS, world)) < 0.25] = 0
    return kept


def run(rank: int, world: int) -> dict:
    """What `agreed_batches` yields on this rank (None, or the batch's size) and the totals it prints."""
    from text4vpr.train.data import agreed_batches

    loader = [{"index": torch.arange(k), "skipped": torch.tensor(PER - k)} for k in kept_table(world)[:, rank].tolist()]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sizes = [None if b is None else int(b["index"].shape[0]) for b in agreed_batches(loader, f"rank {rank}")]
    totals = [int(n) for n in re.findall(r"^rank \d: (\d+) samples skipped so far on all ranks", out.getvalue(), re.M)]
    return {"sizes": sizes, "totals": totals}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    Path(out_dir, f"agreed-{rank}.json").write_text(json.dumps(run(rank, dist.get_world_size())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
