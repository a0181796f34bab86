"""What differs between the trainer's two engines (DDP or one process; DeepSpeed ZeRO-2), built
once: autocast, backward, no_sync, gradient reduction, clipping, the fp16 scaler, checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import DistributedType, gather_object

from text4vpr.config import ConfigError
from text4vpr.train import checkpoint as ckpt
from text4vpr.train import deepspeed_checkpoint as dsckpt
from text4vpr.train.config import RunConfig
from text4vpr.train.deepspeed_config import add_torch_autocast
from text4vpr.train.optim import drop_update
from text4vpr.train.step import cached_backward, finite, plain_backward
from text4vpr.utils.distributed import average_gradients, broadcast_buffers, global_count


class DDPStrategy:
    """Accelerate's DDP (or one process): the trainer clips, a non-finite step shows in the
    gradient norm after backward (no extra sync), checkpoints are the package's safetensors."""

    check_loss_first = False

    def __init__(self, acc, cfg: RunConfig):
        self.acc, self.cfg = acc, cfg
        self.scaler = acc.scaler  # fp16's loss scaler; None otherwise

    # ---- one step
    def forward_backward(self, model, batch: dict, loss_fn) -> torch.Tensor:
        """Loss and gradients of `batch` (plain, or gradient-cached over train.micro_batches)."""
        n = self.cfg.train.micro_batches
        if n > 1:
            return cached_backward(model, batch, loss_fn, self, n, self.acc.unwrap_model(model).text_head)
        return plain_backward(model, batch, loss_fn, self)

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)  # scales the loss under fp16

    def no_sync(self, model):
        return self.acc.no_sync(model)

    def reduce_grads(self, model) -> None:
        """After a step run wholly under no_sync (gradient caching), what DDP would have done:
        average the gradients, align the buffers on rank 0's. No-ops in one process."""
        average_gradients(model.parameters())
        broadcast_buffers(model)

    def clip(self, model, extra=()) -> torch.Tensor | None:
        """Clip the model's and `extra` parameters (the loss's) to optim.grad_clip (no clipping
        at 0); the total norm, for the finiteness check."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return self.acc.clip_grad_norm_([*model.parameters(), *extra], max_norm)

    def drop_update(self, optimizer) -> None:
        drop_update(optimizer, self.scaler)

    def scaler_backoff(self, loss: torch.Tensor) -> float | None:
        """fp16, a finite loss with non-finite gradients: the scaler backs off, as it is meant to
        (its scale, routine at the start, not a fault); None otherwise."""
        return float(self.scaler.get_scale()) if self.scaler is not None and finite(loss) else None

    def global_pairs(self, local: int) -> int:
        """The step's pairs over all ranks (ranks may hold different numbers of views)."""
        return global_count(local, self.acc.device)

    # ---- checkpoints
    def save(self, ckpt_dir: Path, step: int, modules, optimizer, state: dict) -> None:
        """Model, loss, optimizer, every rank's RNG and `state`, written by the main process."""
        rngs = gather_object([ckpt.rng_state()]) if self.acc.num_processes > 1 else [ckpt.rng_state()]
        self.acc.wait_for_everyone()
        ckpt.save_checkpoint(ckpt_dir, step, modules, optimizer, self._with_scaler(state), rngs,
                             self.acc.is_main_process, self.cfg.train.keep_last)
        self.acc.wait_for_everyone()

    def load(self, path: Path, modules, optimizer, engine=None) -> dict:
        """Restore what `save` wrote at `path` (verified by `resolve_resume`); return its `state`."""
        return self._restore_scaler(ckpt.load_checkpoint(path, modules, optimizer, self.acc.process_index, verified=True))

    def _with_scaler(self, state: dict) -> dict:
        return state if self.scaler is None else {**state, "scaler": self.scaler.state_dict()}  # fp16: the scale resumes

    def _restore_scaler(self, state: dict) -> dict:
        saved = state.pop("scaler", None)
        if saved is not None and self.scaler is not None:
            self.scaler.load_state_dict(saved)
        return state


class DeepSpeedStrategy(DDPStrategy):
    """ZeRO-2: the engine clips inside its step and owns its checkpoints; its backward also steps,
    so a non-finite loss is caught before it; bf16 is torch's autocast inside the engine."""

    check_loss_first = True

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

    def backward(self, loss: torch.Tensor) -> None:
        if finite(loss):  # the loss is the global value on every rank: all skip alike (one sync)
            self.acc.backward(loss)

    def clip(self, model, extra=()) -> None:
        return None  # DeepSpeed clips inside its own step (gradient_clipping in its config)

    def save(self, ckpt_dir: Path, step: int, modules, optimizer, state: dict) -> None:
        dsckpt.save_accelerate_checkpoint(self.acc, ckpt_dir, step, self._with_scaler(state), self.cfg.train.keep_last)

    def load(self, path: Path, modules, optimizer, engine=None) -> dict:
        """`engine`: the prepared DeepSpeed engine (its own partitioned format, read weights-only)."""
        return self._restore_scaler(dsckpt.load_deepspeed_checkpoint(engine, path, self.acc.process_index, verified=True))


def make_strategy(acc, cfg: RunConfig) -> DDPStrategy:
    """The strategy for the engine `acc` runs (refuses options DeepSpeed cannot honour)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedStrategy(acc, cfg)
    return DDPStrategy(acc, cfg)
