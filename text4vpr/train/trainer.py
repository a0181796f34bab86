"""The trainer: Accelerate (DDP or DeepSpeed ZeRO-2, behind `strategy`), cross-rank negatives,
exact resume. `Trainer.train()` reads top to bottom; the work is in this package's small modules."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from text4vpr.config import dump_yaml
from text4vpr.losses import ContrastiveLoss
from text4vpr.retrieval.evaluate import evaluate
from text4vpr.retrieval.metrics import key
from text4vpr.train.config import RunConfig
from text4vpr.train.data import (
    DataPaths, check_split_overlap_once, eval_loader, link_run_shards, prepare_data, steps_per_epoch, train_loader,
)
from text4vpr.train.elastic import log_locations, resume_point, run_shape
from text4vpr.train.logs import MetricsLogger, truncate_metrics
from text4vpr.train.model import build_model, train_text_settings
from text4vpr.train.optim import build_optimizer, build_scheduler
from text4vpr.train.preempt import StopSignals
from text4vpr.train.preflight import check_run_inputs
from text4vpr.train.run_dir import prepare_run_dir
from text4vpr.train.state import TrainState
from text4vpr.train.strategy import make_strategy
from text4vpr.train.trackers import TRACKERS_DIR, start_trackers, tracker_names
from text4vpr.utils.progress import Progress
from text4vpr.utils.atomic import atomic_write_text
from text4vpr.utils.distributed import main_value


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.train
        check_run_inputs(cfg)  # every path and key the run names, before anything is written
        self.trackers = tracker_names(t.log_with, t.tensorboard)
        self.acc = Accelerator(mixed_precision=t.mixed_precision, cpu=t.cpu, log_with=self.trackers or None,
                               project_dir=str(Path(t.output_dir) / TRACKERS_DIR))
        set_seed(t.seed)
        self.run_dir = Path(t.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.strategy = make_strategy(self.acc, cfg)  # DDP or DeepSpeed: everything that differs
        self.paths: DataPaths = prepare_data(cfg.data, self.acc)
        check_split_overlap_once(self.paths, cfg.data.allow_split_overlap, self.acc)
        # never mix runs; after every refusal above, so train.overwrite=true never clears a run for nothing
        prepare_run_dir(self.run_dir, cfg, self.acc.is_main_process, self.acc.wait_for_everyone,
                        share=main_value if self.acc.num_processes > 1 else None, report=self.acc.print)
        if self.acc.is_main_process:  # first: a folder with a run in it always names its config
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
            if cfg.data.synthetic.locations > 0:  # the demo's shards where the README's next commands look
                link_run_shards(self.paths, self.run_dir)
        self.resume_path, cfg.data.loader = resume_point(t.resume, self.ckpt_dir, cfg.data.loader, self.acc)
        model, self.tokenizer = build_model(cfg.model, self.paths.tokenizer, cfg.data.loader, t, self.acc.num_processes)
        self.text_settings = train_text_settings(cfg.data.loader, self.tokenizer)  # saved with the model
        self.loss_fn = ContrastiveLoss(**dataclasses.asdict(cfg.loss)).to(self.acc.device)
        optimizer = build_optimizer(model, cfg.optim, extra=list(self.loss_fn.parameters()))
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.steps_per_epoch = steps_per_epoch(self.paths, cfg.data.loader, self.acc.num_processes)
        self.stop_step = t.max_steps or t.epochs * self.steps_per_epoch
        self.schedule_steps = self.stop_step  # a resume keeps the checkpoint's (`_keep_schedule`)
        self.scheduler = build_scheduler(self.optimizer, self.schedule_steps, cfg.optim)
        self.frozen_cache = self._frozen_cache()
        self.state = TrainState()
        self._resume()
        if self.acc.is_main_process:  # this run's log: nothing after the step it resumes from
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        start_trackers(self.acc, self.trackers, self.run_dir, dataclasses.asdict(cfg))
        self.log = MetricsLogger(self.run_dir, self.acc if self.trackers else None, enabled=self.acc.is_main_process)

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        """Run to `stop_step`, validating and checkpointing on the way; return final metrics."""
        bar = Progress(self.stop_step, self.state.step, enabled=self.acc.is_main_process and self.cfg.train.progress)
        try:
            with StopSignals() as stop, bar:  # a signal: checkpoint at the next step on every rank, stop; bar closed first
                while not self.done and self.state.epoch < self.epochs_needed:
                    for batch in self.epoch_loader(self.state.epoch, self.state.batch_in_epoch):
                        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses
                        loss, pairs, seconds = self.step(batch)
                        self.state.batch_in_epoch += 1
                        bar.update(loss, pairs / seconds, lr)
                        self.after_step(loss, lr, pairs, seconds)
                        stop.checkpoint_if_asked(self.acc.device, self.save, self.state.step, self.ckpt_dir)
                        if self.done:
                            break
                    if self.state.batch_in_epoch >= self.steps_per_epoch:
                        self.end_epoch()
                stop.checkpoint_if_asked(self.acc.device, self.save, self.state.step, self.ckpt_dir)  # no step follows
            return self.finish()  # the bar is closed: the final table starts a line of its own
        finally:  # a run that raises closes its bar, metrics file and trackers too
            bar.close()
            self.log.close()

    def epoch_loader(self, epoch: int, start_batch: int):
        """This rank's loader for `epoch`; locations already in the frozen-trunk cache come
        without decoded images (the cache replaces them), so cached epochs skip JPEG decoding."""
        skip = self.frozen_cache.locations() if self.frozen_cache is not None else frozenset()
        return train_loader(self.paths, self.cfg.data.loader, self.acc, epoch, start_batch, skip_images=skip)

    @property
    def done(self) -> bool:
        return self.state.step >= self.stop_step

    @property
    def epochs_needed(self) -> int:
        return math.ceil(self.stop_step / self.steps_per_epoch)

    # ------------------------------------------------------------------ one step
    def step(self, batch: dict | None) -> tuple[float, int, float]:
        """Forward, backward, clip, optimizer and scheduler step (or a counted skip); `batch`
        None: a global batch dropped on every rank (`agreed_batches`), a step without an update."""
        t0 = time.perf_counter()
        if batch is None:
            return self._dropped_step(t0)
        local_pairs = int(batch["view_mask"].sum())  # on the host: no device sync
        index = batch["index"].tolist()  # host copy: the locations log and the frozen cache
        log_locations(self.log, self.state.step + 1, index, self.acc.num_processes, self.cfg.train.log_locations)
        batch = self._to_device(batch, index)
        self.model.train()
        loss = self.strategy.forward_backward(self.model, batch, self.loss_fn)
        grad_norm = self.strategy.clip(self.model, self.loss_fn.parameters())
        if self._skip(loss, grad_norm):
            self.strategy.drop_update(self.optimizer)
        else:
            self.optimizer.step()
            self.loss_fn.clamp_scale_()  # a learnable temperature back under its cap (open_clip's rule)
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_in_row = 0
        self.scheduler.step()
        self.state.step += 1
        pairs = self.strategy.global_pairs(local_pairs)  # ranks may hold different numbers of views
        return float(loss), pairs, time.perf_counter() - t0

    def _dropped_step(self, t0: float) -> tuple[float, int, float]:
        # a rank had none of its share (on_error=skip): every rank steps the schedule, so steps stay global batches
        self.log.log("dropped_batch", self.state.step + 1, epoch=self.state.epoch, batch=self.state.batch_in_epoch)
        self.scheduler.step()
        self.state.step += 1
        return float("nan"), 0, time.perf_counter() - t0

    def _to_device(self, batch: dict, index: list[int]) -> dict:
        """The batch on the device; cached frozen-trunk tokens instead of images when cached."""
        complete = bool(batch["view_mask"].all())  # on the host: the model skips its mask check
        if self.frozen_cache is not None and self.frozen_cache.covers(index):
            batch = {k: v for k, v in batch.items() if k != "images"}  # not needed: no copy to the device
        batch = {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}
        batch["views_complete"] = complete
        if self.frozen_cache is not None:
            with self.strategy.autocast():
                batch["frozen_tokens"] = self.frozen_cache.tokens(batch, index)
        return batch

    def _skip(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Skip the update when the loss or gradient is non-finite on any rank; stop after many."""
        # the loss is the global value on every rank, and the clipped norm is taken after DDP's
        # all-reduce, so every rank reaches the same verdict without a collective (one sync)
        checked = loss if grad_norm is None else torch.stack([loss.float(), torch.as_tensor(grad_norm, device=loss.device).float()])
        if bool(torch.isfinite(checked).all()):
            return False
        scale = self.strategy.scaler_backoff(loss)
        if scale is not None:  # fp16 overflow: skipped by design, not a fault to count
            self.state.loss_scale_backoffs += 1
            self.log.log("loss_scale_backoff", self.state.step, scale=scale)
            return True
        self.state.nonfinite_total += 1
        self.state.nonfinite_in_row += 1
        self.log.log("nonfinite", self.state.step, total=self.state.nonfinite_total)
        if self.state.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{self.state.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                f"(last at step {self.state.step}); lower optim.lr, enable optim.grad_clip, or check the data"
            )
        return True

    def _frozen_cache(self):
        t = self.cfg.train
        if not t.frozen_cache:
            return None
        from text4vpr.train.frozen_cache import FrozenTrunkCache

        if self.acc.num_processes > 1 and not self.cfg.data.loader.fixed_shard_assignment:
            self.acc.print("train.frozen_cache: in the elastic order each rank's cache grows towards every location; "
                           "data.loader.fixed_shard_assignment=true keeps 1/world per rank, not elastic (docs/data.md)")
        device = self.acc.device if t.frozen_cache_device == "auto" else t.frozen_cache_device
        return FrozenTrunkCache(self.acc.unwrap_model(self.model), device, t.frozen_cache_dtype)

    # ------------------------------------------------------------------ around steps
    def after_step(self, loss: float, lr: float, pairs: int, seconds: float) -> None:
        t, s = self.cfg.train, self.state.step
        if s % max(1, t.log_every_steps) == 0 or s == 1:
            self.log.log("train", s, loss=loss, lr=lr, pairs_per_s=pairs / seconds,
                         epoch=self.state.epoch, nonfinite_total=self.state.nonfinite_total)
        if self.cfg.eval.every_steps and s % self.cfg.eval.every_steps == 0:
            self.validate()
        epoch_end = self.state.batch_in_epoch >= self.steps_per_epoch  # end_epoch() saves then
        if ((t.save_every_steps and s % t.save_every_steps == 0) or self.done) and not epoch_end:
            self.save()

    def end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        if self.frozen_cache is not None:
            self.log.log("frozen_cache", self.state.step, **self.frozen_cache.stats())
        if not self.cfg.eval.every_steps:
            self.validate()
        self.save()

    def validate(self) -> dict:
        metrics = self._evaluate(self.paths.val).metrics
        top1 = metrics["accuracy"].get(key(1), {}).get(key(5.0), -1.0)  # upstream's choice; -1 if not evaluated
        self.log.log("val", self.state.step, accuracy=metrics["accuracy"], epoch=self.state.epoch)
        if top1 > self.state.best_top1_5m:
            self.state.best_top1_5m, self.state.best_step = top1, self.state.step
            self._export(self.run_dir / "best_model")
        return metrics

    def _evaluate(self, shards: str):
        e = self.cfg.eval
        loader = eval_loader(shards, self.cfg.data.loader, self.paths.tokenizer, self.acc)
        model = self.acc.unwrap_model(self.model)
        model.eval()
        with self.strategy.autocast():
            result = evaluate(model, loader, ks=tuple(e.ks), radii=tuple(e.radii), mode=e.mode, device=self.acc.device)
        model.train()
        return result

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        state = {**dataclasses.asdict(self.state), "scheduler": self.scheduler.state_dict(),
                 "schedule_steps": self.schedule_steps,
                 **run_shape(self.cfg.data.loader, self.acc.num_processes)}  # a resume on another world keeps G
        self.strategy.save(self.ckpt_dir, self.state.step, self._modules(), self.optimizer, state)

    def _resume(self) -> None:
        if (path := self.resume_path) is None:
            return
        state = self.strategy.load(path, self._modules(), self.optimizer, engine=self.model)
        self._keep_schedule(state.pop("schedule_steps", self.schedule_steps))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.state = TrainState(**state)
        self.acc.print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch_in_epoch})")

    def _keep_schedule(self, saved: int) -> None:
        """A resume may stop elsewhere (train.max_steps / epochs), but the lr schedule keeps the
        length it was started with, or the lr would jump."""
        if saved == self.schedule_steps:
            return
        self.acc.print(f"train.max_steps / train.epochs: stopping at step {self.stop_step}; the lr schedule keeps "
                       f"the {saved} steps the run started with")
        self.schedule_steps = saved
        lrs = [g["lr"] for g in self.optimizer.param_groups]  # as loaded; a new scheduler resets them
        self.scheduler = build_scheduler(self.optimizer, saved, self.cfg.optim)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def _modules(self) -> torch.nn.ModuleDict:
        """What a checkpoint holds besides the optimizer: the model and the loss (temperature)."""
        return torch.nn.ModuleDict({"model": self.acc.unwrap_model(self.model), "loss": self.loss_fn})

    def _export(self, out: Path) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.model).save_pretrained(out, tokenizer=self.tokenizer, text_settings=self.text_settings)
        self.acc.wait_for_everyone()

    def finish(self) -> dict:
        """Export the final model, evaluate the best one on the held-out split, write the report."""
        from text4vpr.train.finish import FinalRun, finish_run

        self._export(self.run_dir / "model")
        if not self.cfg.eval.final:
            return {}
        st, e = self.state, self.cfg.eval
        run = FinalRun(
            run_dir=self.run_dir, test_shards=self.paths.test,
            split="test" if self.cfg.data.test_shards or self.paths.test != self.paths.val else "val",
            ks=tuple(e.ks), radii=tuple(e.radii), steps=st.step, epochs=st.epoch, best_step=st.best_step,
            processes=self.acc.num_processes, nonfinite_skipped=st.nonfinite_total,
            loss_scale_backoffs=st.loss_scale_backoffs if self.strategy.scaler is not None else None,
            is_main=self.acc.is_main_process, html_gallery=e.gallery if e.html else None,
            config_text=dump_yaml(self.cfg),
        )
        return finish_run(self.acc.unwrap_model(self.model), self._evaluate, run)

