"""What differs between the trainer's two engines, behind one small object.

`DDPStrategy` (Accelerate's DDP, or one process): the trainer clips, catches a non-finite
step from the gradient norm after backward, and writes its own safetensors checkpoints.
`DeepSpeedStrategy` (ZeRO-2): the engine clips inside its step and owns its checkpoints; a
non-finite loss must be caught before backward (the engine's backward also steps), and
bf16 is torch's autocast inside the engine. The trainer never asks which engine runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import DistributedType, gather_object

from text4vpr.config import ConfigError
from text4vpr.train import checkpoint as ckpt
from text4vpr.train import deepspeed_checkpoint as dsckpt
from text4vpr.train.config import RunConfig
from text4vpr.train.deepspeed_config import add_torch_autocast


class DDPStrategy:
    check_loss_first = False  # a non-finite loss shows in the gradient norm: no extra device sync

    def __init__(self, acc, cfg: RunConfig):
        self.acc, self.cfg = acc, cfg

    def autocast(self):
        return self.acc.autocast()

    def clip(self, model, extra=()) -> torch.Tensor | None:
        """Clip the model's and `extra` parameters (the loss's) to optim.grad_clip (no clipping
        at 0); the total norm, for the finiteness check."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return self.acc.clip_grad_norm_([*model.parameters(), *extra], max_norm)

    def save(self, ckpt_dir: Path, step: int, modules, optimizer, state: dict) -> None:
        """Model, loss, optimizer, every rank's RNG and `state`, written by the main process."""
        rngs = gather_object([ckpt.rng_state()]) if self.acc.num_processes > 1 else [ckpt.rng_state()]
        self.acc.wait_for_everyone()
        ckpt.save_checkpoint(ckpt_dir, step, modules, optimizer, state, rngs, self.acc.is_main_process,
                             self.cfg.train.keep_last)
        self.acc.wait_for_everyone()

    def load(self, path: Path, modules, optimizer, engine=None) -> dict:
        """Restore what `save` wrote at `path` (verified by `resolve_resume`); return its `state`."""
        return ckpt.load_checkpoint(path, modules, optimizer, self.acc.process_index, verified=True)


class DeepSpeedStrategy(DDPStrategy):
    check_loss_first = True  # the engine's backward also steps the optimizer

    def __init__(self, acc, cfg: RunConfig):
        super().__init__(acc, cfg)
        t = cfg.train
        if add_torch_autocast(acc.state.deepspeed_plugin.deepspeed_config, t.mixed_precision):
            acc.print("DeepSpeed: torch_autocast section added (bf16 forward inside the engine, fp32 gradients)")
        if cfg.loss.learnable:
            raise ConfigError("loss.learnable=true is not supported under DeepSpeed: the engine optimises only the "
                             "model's parameters and the temperature lives in the loss; use DDP or a fixed temperature")
        if t.micro_batches > 1:
            raise ConfigError("train.micro_batches > 1 (gradient caching) is not supported under DeepSpeed, whose "
                             "backward also steps the optimizer; use DDP for gradient caching")

    def autocast(self):
        """torch's autocast for bf16 (DeepSpeed's own bf16 mode is off, see launch/)."""
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.acc.device.type, dtype=torch.bfloat16)
        return self.acc.autocast()

    def clip(self, model, extra=()) -> None:
        return None  # DeepSpeed clips inside its own step (gradient_clipping in its config)

    def save(self, ckpt_dir: Path, step: int, modules, optimizer, state: dict) -> None:
        dsckpt.save_accelerate_checkpoint(self.acc, ckpt_dir, step, state, self.cfg.train.keep_last)

    def load(self, path: Path, modules, optimizer, engine=None) -> dict:
        """`engine`: the prepared DeepSpeed engine (its own partitioned format, read weights-only)."""
        return dsckpt.load_deepspeed_checkpoint(engine, path, self.acc.process_index, verified=True)


def make_strategy(acc, cfg: RunConfig) -> DDPStrategy:
    """The strategy for the engine `acc` runs (refuses options DeepSpeed cannot honour)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedStrategy(acc, cfg)
    return DDPStrategy(acc, cfg)
