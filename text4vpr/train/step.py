"""One training step's forward/backward: plain, or gradient-cached over micro-batches.

Gradient caching (Gao et al., 2021): encode the step's batch in micro-batches without
keeping activations, run the (cross-rank) loss on all embeddings at once, then re-encode
each micro-batch and back-propagate its embedding gradients. Negatives = the whole step's
batch on every rank, activation memory = one micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


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
        raise ValueError(f"train.micro_batches={n} exceeds the per-rank batch of {size} locations")
    bounds = torch.linspace(0, size, n + 1).round().long().tolist()
    return [{k: v[a:b] if torch.is_tensor(v) else v for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def encode(model, batch: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast():
        img, txt = model(**model_inputs(batch))
    return img.float(), txt.float()


def finite(loss: torch.Tensor) -> bool:
    """The loss value is the global one on every rank, so every rank decides alike."""
    return bool(torch.isfinite(loss.detach()))


def plain_backward(model, batch: dict, loss_fn: Callable, backward: Callable, autocast, check_first: bool = False) -> torch.Tensor:
    """Encode the whole batch with activations, loss, backward. Returns the detached loss.

    `check_first` skips the backward of a non-finite loss (for engines that step inside
    backward, like DeepSpeed); it costs a device sync, so DDP checks the gradient norm after.
    """
    img, txt = encode(model, batch, autocast)
    i, t, g = pairs(batch, img, txt)
    loss = loss_fn(i, t, g)
    if not check_first or finite(loss):
        backward(loss)
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


def cached_backward(
    model, batch: dict, loss_fn: Callable, backward: Callable, autocast, micro_batches: int, no_sync: Callable,
    check_first: bool = False,
) -> torch.Tensor:
    """Gradient-cached step: equal to `plain_backward` on the whole batch (dropout replayed
    with the same RNG; BatchNorm statistics are per micro-batch, as with any accumulation)."""
    chunks = split_batch(batch, micro_batches)
    device = batch["view_mask"].device
    saved_buffers = _buffers(model)
    rngs, imgs, txts = [], [], []
    with torch.no_grad():
        for c in chunks:
            rngs.append(_rng_states(device))
            img, txt = encode(model, c, autocast)
            imgs.append(img)
            txts.append(txt)
    after = _rng_states(device)
    _restore_buffers(model, saved_buffers)  # the replay below updates running stats once
    img = torch.cat(imgs).requires_grad_()  # (B, V, D) leaf
    txt = torch.cat(txts).requires_grad_()
    i, t, g = pairs(batch, img, txt)
    loss = loss_fn(i, t, g)
    if check_first and not finite(loss):
        _set_rng_states(after, device)
        return loss.detach()
    loss.backward()  # gradients w.r.t. the embeddings only (and loss parameters)
    sizes = [c["view_mask"].shape[0] for c in chunks]
    for j, (c, gi, gt) in enumerate(zip(chunks, img.grad.split(sizes), txt.grad.split(sizes))):
        _set_rng_states(rngs[j], device)
        ctx = no_sync(model) if j < len(chunks) - 1 else contextlib.nullcontext()
        with ctx:
            ri, rt = encode(model, c, autocast)
            backward((ri * gi).sum() + (rt * gt).sum())
    _set_rng_states(after, device)
    return loss.detach()
