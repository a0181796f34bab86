"""The engine strategy: DDP clips by optim.grad_clip and checks after backward; DeepSpeed
clips inside its engine, checks the loss first and refuses what it cannot honour."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from text4vpr.losses import ContrastiveLoss
from text4vpr.train.config import RunConfig
from text4vpr.train.strategy import DDPStrategy, DeepSpeedStrategy, make_strategy


def _acc(kind):
    plugin = SimpleNamespace(deepspeed_config={})
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin), print=print,
                           clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


def _cfg(**train):
    cfg = RunConfig()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_the_engine_picks_the_strategy():
    assert type(make_strategy(_acc(DistributedType.NO), _cfg())) is DDPStrategy
    assert type(make_strategy(_acc(DistributedType.MULTI_CPU), _cfg())) is DDPStrategy
    ds = make_strategy(_acc(DistributedType.DEEPSPEED), _cfg())
    assert type(ds) is DeepSpeedStrategy and ds.check_loss_first and not DDPStrategy.check_loss_first


def test_deepspeed_refuses_a_learnable_temperature_and_gradient_caching():
    cfg = _cfg()
    cfg.loss.learnable = True
    with pytest.raises(ValueError, match="loss.learnable"):
        make_strategy(_acc(DistributedType.DEEPSPEED), cfg)
    with pytest.raises(ValueError, match="micro_batches"):
        make_strategy(_acc(DistributedType.DEEPSPEED), _cfg(micro_batches=2))


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_ddp_clips_to_optim_grad_clip(grad_clip):
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    cfg = _cfg()
    cfg.optim.grad_clip = grad_clip
    norm = make_strategy(_acc(DistributedType.NO), cfg).clip(model)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(norm, before)  # the norm before clipping, for the finiteness check
    torch.testing.assert_close(after, before if grad_clip == 0 else torch.tensor(grad_clip), rtol=1e-5, atol=0)
    assert make_strategy(_acc(DistributedType.DEEPSPEED), _cfg()).clip(model) is None  # the engine clips


def test_ddp_clip_and_its_norm_cover_the_loss_parameters():
    """A learnable temperature is clipped with the model and a non-finite gradient of it shows in the norm."""
    model, loss_fn = torch.nn.Linear(3, 2), ContrastiveLoss(learnable=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    loss_fn.log_scale.grad = torch.tensor(3.0)
    cfg = _cfg()
    cfg.optim.grad_clip = 1.0
    strategy = make_strategy(_acc(DistributedType.NO), cfg)
    torch.testing.assert_close(strategy.clip(model, loss_fn.parameters()), torch.tensor(3.0))
    torch.testing.assert_close(loss_fn.log_scale.grad, torch.tensor(1.0), rtol=1e-5, atol=0)
    loss_fn.log_scale.grad = torch.tensor(float("nan"))
    assert not torch.isfinite(strategy.clip(model, loss_fn.parameters()))
