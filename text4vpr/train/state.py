"""The trainer's host-side state: everything besides tensors that an exact resume needs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainState:
    """Everything besides tensors that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_total: int = 0
    loss_scale_backoffs: int = 0  # fp16: steps whose scaled gradients overflowed (skipped by design)
    nonfinite_in_row: int = 0
    best_top1_5m: float = -1.0
    best_step: int = -1
    global_batch: int = 0  # locations per step over all ranks: kept when resuming on another world size
    world_size: int = 0  # ranks of the run that saved (batch_in_epoch counts global batches)
