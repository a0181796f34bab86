"""Gradient caching equals one big batch (BatchNorm in train mode included); pairs/split keep every view."""

import contextlib

import pytest
import torch

from text4vpr.losses import ContrastiveLoss
from text4vpr.models import Text4VPR, tiny_config
from tests.helpers import assert_close_by_norm
from text4vpr.train.step import StepContext, cached_backward, pairs, plain_backward, split_batch


def _batch(b=6, v=4, size=28, length=12, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, v, dtype=torch.bool)
    mask[1, 2] = False  # a partial location
    ids = torch.randint(3, vocab, (b, v, length), generator=g)
    att = torch.ones(b, v, length, dtype=torch.long)
    att[:, :, 9:] = 0
    ids[att == 0] = 0
    ids[~mask] = 0
    att[~mask] = 0
    return {
        "images": torch.randn(b, v, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": att,
        "view_mask": mask,
        "coords": torch.randn(b, 3, generator=g, dtype=torch.float64),
        "index": torch.arange(b) * 7,
    }


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pairs_keep_present_views():
    batch = _batch()
    img = torch.randn(6, 4, 8)
    i, t, g = pairs(batch, img, img)
    assert i.shape == (23, 8) and g.shape == (23,)
    assert set(g.tolist()) == set(batch["index"].tolist())


def test_split_batch_covers_everything():
    batch = _batch(b=7)
    chunks = split_batch(batch, 3)
    assert [c["index"].shape[0] for c in chunks] == [2, 3, 2]
    assert torch.equal(torch.cat([c["index"] for c in chunks]), batch["index"])


def _model(**text):
    """Tiny model in train mode with every dropout off, so both paths compute one function;
    BatchNorm uses batch statistics (the part gradient caching must not change)."""
    from dataclasses import replace

    cfg = tiny_config(vocab_size=300, image_size=28)
    cfg = replace(cfg, aggregation=replace(cfg.aggregation, dropout=0.0),
                  text=replace(cfg.text, dropout=0.0, residual_dropout=0.0, **text))
    torch.manual_seed(0)
    return Text4VPR(cfg).train()


def _run_cached(model, batch, loss_fn, backward, n):
    return cached_backward(model, batch, StepContext(loss_fn, backward, contextlib.nullcontext, text_head=model.text_head), n)


def _backward(loss):
    loss.backward()


def _assert_grads_close(actual: dict, expected: dict, scale: float = 1.0) -> None:
    assert actual.keys() == expected.keys() and len(expected) > 10
    for name, g in expected.items():
        # a scalar's gradient (tau) sums every Sinkhorn entry: fp32 summation order alone moves it
        # ~2e-5; the floor covers gradients that are exactly 0 in exact arithmetic (the Linear
        # bias before BatchNorm: ~1e-7 of rounding noise either way)
        rel = 1e-4 if g.numel() == 1 else 1e-5
        assert_close_by_norm(actual[name] / scale, g, rel=rel, floor=1e-7, name=name)


def _plain_grads(model, batch, loss_fn):
    """(loss, gradients) of the plain whole-batch step; the model's gradients are cleared after."""
    loss = plain_backward(model, batch, StepContext(loss_fn, _backward, contextlib.nullcontext))
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("micro_batches", [2, 3])
def test_gradient_cache_equals_big_batch_with_batchnorm_in_train_mode(micro_batches):
    model = _model()
    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()
    bn = model.text_encoder.projection[1]
    loss_plain, g_plain = _plain_grads(model, batch, loss_fn)
    stats_plain = (bn.running_mean.clone(), bn.running_var.clone())
    bn.reset_running_stats()
    loss_cached = _run_cached(model, batch, loss_fn, _backward, micro_batches)
    g_cached = _grads(model)
    torch.testing.assert_close(loss_cached, loss_plain, rtol=1e-6, atol=1e-6)
    _assert_grads_close(g_cached, g_plain)
    # running statistics move once per step, with the whole batch's statistics
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, stats_plain[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_var, stats_plain[1], rtol=1e-5, atol=1e-7)


def test_gradient_cache_keeps_the_loss_scale_consistent():
    """A scaling backward (fp16's GradScaler) scales every gradient once: head and towers alike."""
    model = _model()
    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()
    _, g_plain = _plain_grads(model, batch, loss_fn)
    _run_cached(model, batch, loss_fn, lambda loss: (loss * 8.0).backward(), 3)
    _assert_grads_close(_grads(model), g_plain, scale=8.0)


def test_gradient_cache_replays_dropout_in_the_second_pass():
    """With dropout on, pass 3 sees pass 1's masks: the re-encoded outputs equal the cached ones."""
    torch.manual_seed(0)
    model = Text4VPR(tiny_config(vocab_size=300, image_size=28)).train()
    assert model.aggregation.cluster_features[1].p > 0
    forward = model.forward
    calls = _record_forward(model)
    torch.manual_seed(1)
    rng_before = torch.get_rng_state()
    _run_cached(model, _batch(), ContrastiveLoss(temperature=0.1), _backward, 3)
    _assert_second_pass_repeats_first(calls, 3)
    assert not torch.equal(calls[0][0], forward(**_first_chunk_inputs(model))[0].detach())  # dropout is live
    assert not torch.equal(torch.get_rng_state(), rng_before)  # the generator moved on


def _first_chunk_inputs(model):
    from text4vpr.train.step import model_inputs

    return {**model_inputs(split_batch(_batch(), 3)[0]), "text_head": False}


def test_gradient_cache_with_the_upstream_frozen_projection():
    """The upstream mode (no gradient through the text projection or T5) still matches."""
    model = _model(freeze_projection_at_init=True)
    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()
    _, g_plain = _plain_grads(model, batch, loss_fn)
    _run_cached(model, batch, loss_fn, _backward, 2)
    g_cached = _grads(model)
    assert not any(k.startswith(("text_encoder.backbone", "text_encoder.projection")) for k in g_plain)
    _assert_grads_close(g_cached, g_plain)


def test_gradient_cache_on_frozen_trunk_tokens_equals_the_plain_step_on_images():
    """The two speed options compose: micro-batches over cached frozen tokens = plain on images."""
    model = _model()
    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()
    _, g_plain = _plain_grads(model, batch, loss_fn)
    tokens = model.frozen_image_tokens(batch["images"], batch["view_mask"])  # (B, V, 1 + hw, C)
    cached = {**{k: v for k, v in batch.items() if k != "images"}, "frozen_tokens": tokens}
    _run_cached(model, cached, loss_fn, _backward, 3)
    _assert_grads_close(_grads(model), g_plain)


def test_gradient_cache_under_accelerate_bf16_keeps_the_plain_step_dtypes():
    """Accelerate hands back the model's outputs in fp32; the text head must still see the
    bf16 features the plain step's BatchNorm sees. With one micro-batch and one attention
    kernel for both passes (SDPA picks another kernel under no_grad on CPU), bitwise equal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()
    with _accelerate_bf16() as acc, sdpa_kernel(SDPBackend.MATH):
        model = acc.prepare(_model())
        loss_plain = plain_backward(model, batch, StepContext(loss_fn, _backward, acc.autocast))
        g_plain = _grads(model)
        model.zero_grad(set_to_none=True)
        loss_cached = cached_backward(model, batch, StepContext(loss_fn, _backward, acc.autocast, text_head=model.text_head), 1)
    assert torch.equal(loss_cached, loss_plain)
    g_cached = _grads(model)
    assert all(torch.equal(g_cached[k], g_plain[k]) for k in g_plain)


def test_second_pass_reproduces_the_first_under_bf16():
    """The re-encoding in pass 3 must see what pass 1 saw, or the cached gradients belong to
    another function. Under bf16 a pass without autograd would get another SDPA kernel for
    T5's biased attention (CPU), so pass 1 runs with autograd and saves nothing instead."""
    with _accelerate_bf16() as acc:
        model = acc.prepare(_model())
        calls = _record_forward(model)
        ctx = StepContext(ContrastiveLoss(temperature=0.1), _backward, acc.autocast, text_head=model.text_head)
        cached_backward(model, _batch(), ctx, 3)
    _assert_second_pass_repeats_first(calls, 3)


@contextlib.contextmanager
def _accelerate_bf16():
    """An Accelerator in bf16 on CPU. Accelerate's state is process-wide: reset before (whatever
    an earlier test chose) and after (later trainers choose their own precision again)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield Accelerator(cpu=True, mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _record_forward(model) -> list:
    """Wrap `model.forward` to keep a copy of every call's outputs; returns the list it fills."""
    calls, forward = [], model.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(tuple(o.detach().clone() for o in out))
        return out

    model.forward = recording
    return calls


def _assert_second_pass_repeats_first(calls: list, micro_batches: int) -> None:
    assert len(calls) == 2 * micro_batches  # each micro-batch, twice
    for first, again in zip(calls[:micro_batches], calls[micro_batches:]):
        assert all(torch.equal(a, b) for a, b in zip(first, again))
