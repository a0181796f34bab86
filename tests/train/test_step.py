"""Gradient caching equals one big batch; pairs/split helpers keep every present view."""

import contextlib

import torch

from text4vpr.losses import ContrastiveLoss
from text4vpr.models import Text4VPR, tiny_config
from text4vpr.utils.testing import assert_close_by_norm
from text4vpr.train.step import cached_backward, pairs, plain_backward, split_batch


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


def test_gradient_cache_equals_big_batch():
    torch.manual_seed(0)
    model = Text4VPR(tiny_config(vocab_size=300, image_size=28)).eval()  # deterministic: no dropout, BN stats fixed
    loss_fn = ContrastiveLoss(temperature=0.1)
    batch = _batch()

    def backward(loss):
        loss.backward()

    loss_plain = plain_backward(model, batch, loss_fn, backward, contextlib.nullcontext)
    g_plain = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_cached = cached_backward(model, batch, loss_fn, backward, contextlib.nullcontext, 3,
                                  lambda m: contextlib.nullcontext())
    g_cached = _grads(model)
    torch.testing.assert_close(loss_cached, loss_plain, rtol=1e-6, atol=1e-6)
    assert g_plain.keys() == g_cached.keys() and len(g_plain) > 10
    for name in g_plain:
        assert_close_by_norm(g_cached[name], g_plain[name], rel=1e-5, floor=1e-8, name=name)
