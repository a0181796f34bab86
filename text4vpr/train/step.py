"""One training step's forward/backward: plain, or gradient-cached over micro-batches.

Gradient caching (Gao et al., 2021): encode the step's batch in micro-batches without
keeping activations, run the (cross-rank) loss on all embeddings at once, then re-encode
each micro-batch and back-propagate its embedding gradients. Negatives = the whole step's
batch on every rank, activation memory = one micro-batch. The text tower's BatchNorm (and
the small residual layers after it) run once on the whole batch, between the two passes,
so its statistics are those of the plain step: in fp32 the cached step is the plain step
(tested to summation order). Under bf16 autocast it is the plain step to bf16 rounding, as
micro-batches change GEMM shapes; the re-encoding still reproduces the first pass bitwise
(the first pass runs with autograd and saves nothing, so both pick the same kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from text4vpr.config import ConfigError


@dataclasses.dataclass
class StepContext:
    """What a step's forward/backward needs from the trainer and its engine."""

    loss_fn: Callable  # (img (P, D), txt (P, D), groups (P,)) -> the loss
    backward: Callable  # loss -> None: the engine's backward (loss scaling, DeepSpeed's step)
    autocast: Callable  # () -> the forward's autocast context
    no_sync: Callable = lambda model: contextlib.nullcontext()  # model -> no gradient reduction inside
    text_head: Callable | None = None  # gradient caching: the unwrapped model's `text_head`
    reduce_grads: Callable | None = None  # gradient caching: DDP's reduction, by hand, after the step
    check_first: bool = False  # skip the backward of a non-finite loss (engines that step inside backward)


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments: images, or cached frozen tokens instead of them."""
    inputs = {k: batch[k] for k in ("view_mask", "input_ids", "attention_mask")}
    if "views_complete" in batch:
        inputs["views_complete"] = batch["views_complete"]
    if "frozen_tokens" in batch:
        return {**inputs, "images": None, "frozen_tokens": batch["frozen_tokens"]}
    return {**inputs, "images": batch["images"]}


def pairs(batch: dict, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, V, D) image/text vectors -> (P, D) pairs of present views, with location ids (P,)."""
    mask = batch["view_mask"].to(img.device)  # (B, V)
    groups = batch["index"].to(img.device)[:, None].expand_as(mask)  # (B, V)
    return img[mask], txt[mask], groups[mask]


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split every tensor of the batch along dim 0 into `n` nearly equal micro-batches."""
    size = batch["view_mask"].shape[0]
    if n > size:
        raise ConfigError(f"train.micro_batches={n} exceeds the per-rank batch of {size} locations")
    bounds = torch.linspace(0, size, n + 1).round().long().tolist()
    return [{k: v[a:b] if torch.is_tensor(v) else v for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def encode(model, batch: dict, autocast, text_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V, D) image vectors (fp32) and text vectors (fp32), or the text features before the
    BatchNorm (`text_head=False`: as the model returns them)."""
    with autocast():
        img, txt = model(**model_inputs(batch), text_head=text_head)
    return img.float(), txt.float() if text_head else txt


def finite(loss: torch.Tensor) -> bool:
    """The loss value is the global one on every rank, so every rank decides alike."""
    return bool(torch.isfinite(loss.detach()))


def plain_backward(model, batch: dict, ctx: StepContext) -> torch.Tensor:
    """Encode the whole batch with activations, loss, backward. Returns the detached loss.

    `ctx.check_first` skips the backward of a non-finite loss (for engines that step inside
    backward, like DeepSpeed); it costs a device sync, so DDP checks the gradient norm after.
    """
    img, txt = encode(model, batch, ctx.autocast)
    i, t, g = pairs(batch, img, txt)
    loss = ctx.loss_fn(i, t, g)
    if not ctx.check_first or finite(loss):
        ctx.backward(loss)
    return loss.detach()


def _buffers(model) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _restore_buffers(model, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)


def _rng_states(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def cached_backward(model, batch: dict, ctx: StepContext, micro_batches: int) -> torch.Tensor:
    """Gradient-cached step, equal to `plain_backward` on the whole batch (see the module note on bf16).

    1. each micro-batch through both towers up to the text BatchNorm, without activations;
    2. `ctx.text_head` (BatchNorm over the whole batch, every rank, then the residual layers) and
       the loss on all pairs, with autograd: gradients of the head and of the cached outputs;
    3. each micro-batch again, with activations, back-propagating its cached gradients.
    Dropout in pass 3 replays pass 1's random numbers. Every backward runs under `ctx.no_sync`;
    `ctx.reduce_grads` then averages the gradients over ranks (DDP's reduction, by hand).
    """
    chunks = split_batch(batch, micro_batches)
    device = batch["view_mask"].device
    rngs, img, z = _first_pass(model, chunks, ctx, device)  # (B, V, D) leaves
    i, zp, g = pairs(batch, img, z)  # (P, D), (P, D), (P,)
    with ctx.autocast():
        t = ctx.text_head(_autocast_dtype(zp)).float()  # (P, D): BatchNorm statistics of the whole batch
    loss = ctx.loss_fn(i, t, g)
    after = _rng_states(device)  # after the head's dropout too
    if ctx.check_first and not finite(loss):
        _set_rng_states(after, device)
        return loss.detach()
    with ctx.no_sync(model):
        ctx.backward(loss)  # head and loss parameters, and the cached outputs' gradients
    _second_pass(model, chunks, rngs, _grad(img), _grad(z), ctx, device)
    _set_rng_states(after, device)
    if ctx.reduce_grads is not None:
        ctx.reduce_grads()
    return loss.detach()


def _first_pass(model, chunks: list[dict], ctx: StepContext, device) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Pass 1: every micro-batch without activations (under `no_sync`: DDP must not expect
    a backward). Returns the RNG state before each and the (B, V, D) image vectors and
    pre-BatchNorm text features, as leaves wanting gradients."""
    saved_buffers = _buffers(model)
    rngs, imgs, feats = [], [], []
    with _autograd_without_activations(), ctx.no_sync(model):
        for c in chunks:
            rngs.append(_rng_states(device))
            img, z = encode(model, c, ctx.autocast, text_head=False)
            imgs.append(img.detach())
            feats.append(z.detach())
    _restore_buffers(model, saved_buffers)  # running statistics update in passes 2 and 3 only
    return rngs, torch.cat(imgs).requires_grad_(), torch.cat(feats).requires_grad_()


@contextlib.contextmanager
def _autograd_without_activations():
    """Autograd on, nothing saved for backward: pass 1 keeps no activations (as under no_grad)
    yet every op picks the kernel it picks in pass 3, which runs with autograd (under no_grad,
    SDPA takes another kernel for T5's attention, whose bias wants a gradient), so pass 3
    reproduces pass 1 exactly, bf16 included."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _never):
        yield


def _drop(_: torch.Tensor) -> None:
    return None


def _never(_: None) -> torch.Tensor:
    raise RuntimeError("gradient caching's first pass keeps no activations to back-propagate")


def _second_pass(model, chunks: list[dict], rngs: list, g_img: torch.Tensor, g_z: torch.Tensor,
                 ctx: StepContext, device) -> None:
    """Pass 3: each micro-batch again with activations (pass 1's random numbers), back-propagating
    its slice of the cached gradients (which already carry any loss scale)."""
    sizes = [c["view_mask"].shape[0] for c in chunks]
    for c, rng, gi, gz in zip(chunks, rngs, g_img.split(sizes), g_z.split(sizes)):
        _set_rng_states(rng, device)
        with ctx.no_sync(model):
            ri, rz = encode(model, c, ctx.autocast, text_head=False)
            _backward_from(((ri, gi), (rz, gz)))


def _autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in autocast's dtype when autocast is on: the dtype the Linear before the BatchNorm
    gives in the plain step. (Accelerate returns a model's outputs in fp32: an exact upcast.)"""
    kind = x.device.type
    return x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient, zeros when nothing reached it (e.g. the upstream-frozen text projection)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _backward_from(pairs_: tuple) -> None:
    """Back-propagate given output gradients through the outputs that have a graph."""
    live = [(out, g) for out, g in pairs_ if out.requires_grad]
    if live:
        torch.autograd.backward([o for o, _ in live], [g for _, g in live])
