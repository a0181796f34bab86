"""Skipped updates under fp16 loss scaling: the scaler backs off and the next step runs."""

import pytest
import torch

from text4vpr.train.optim import drop_update


def _overflowing_step(p, opt, scaler):
    """A scaled backward whose gradient overflows, then the unscale_ that clipping does."""
    (scaler.scale(p * float("inf")).sum()).backward()
    scaler.unscale_(opt)


def test_dropped_update_lets_the_next_step_unscale_and_backs_the_scale_off():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _overflowing_step(p, opt, scaler)
    drop_update(opt, scaler)
    assert p.grad is None and scaler.get_scale() == 512.0
    _overflowing_step(p, opt, scaler)  # raised before drop_update() updated the scaler


def test_without_the_update_the_next_unscale_fails():
    """The failure drop_update prevents (so the test above can fail)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _overflowing_step(p, opt, scaler)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="unscale_"):
        _overflowing_step(p, opt, scaler)
