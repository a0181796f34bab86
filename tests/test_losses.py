"""InfoNCE: float64 reference of docs/method.md#training-loss, tiled == plain, exclusion, gradient cache, 2-rank gloo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from text4vpr.losses import MAX_SCALE, ContrastiveLoss, info_nce
from tests.helpers import run_torchrun


def reference_loss(img, txt, temperature=0.1, groups=None):
    """docs/method.md's formula in float64: mean over pairs of CE(row) + CE(column), optional exclusion."""
    i = img.double() / img.double().norm(dim=1, keepdim=True)
    t = txt.double() / txt.double().norm(dim=1, keepdim=True)
    logits = i @ t.T / temperature
    n = logits.shape[0]
    total = 0.0
    for a in range(n):
        row, col = logits[a].clone(), logits[:, a].clone()
        if groups is not None:
            other = (groups == groups[a]) & (torch.arange(n) != a)
            row[other], col[other] = float("-inf"), float("-inf")
        total = total + (torch.logsumexp(row, 0) - row[a]) + (torch.logsumexp(col, 0) - col[a])
    return total / n


def info_nce_and_grads(image_emb, text_emb, temperature=0.1):
    """The gradient cache with a fixed temperature: (loss, d/d image_emb, d/d text_emb)."""
    return ContrastiveLoss(temperature).loss_and_grads(image_emb, text_emb)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("n,d", [(7, 5), (40, 16)])
def test_info_nce_matches_spec_reference(n, d):
    g = torch.Generator().manual_seed(n * 31 + d)
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 3
    assert rel_err(info_nce(img, txt), reference_loss(img, txt)) <= 1e-5
    assert rel_err(info_nce(img, txt, temperature=0.5), reference_loss(img, txt, 0.5)) <= 1e-5


def test_exclusion_matches_reference_and_default_keeps_views():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    groups = torch.arange(4).repeat_interleave(4)
    loss = ContrastiveLoss(exclude_same_location=True)(img, txt, groups)
    assert rel_err(loss, reference_loss(img, txt, 0.1, groups)) <= 1e-5
    # default: other views stay negatives, group ids are ignored
    assert rel_err(ContrastiveLoss()(img, txt, groups), reference_loss(img, txt, 0.1)) <= 1e-5


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
def test_tiled_equals_plain_forward_and_backward(exclude, learnable):
    g = torch.Generator().manual_seed(11)
    img, txt = torch.randn(37, 12, generator=g), torch.randn(37, 12, generator=g)
    groups = torch.randint(0, 9, (37,), generator=g)
    out = []
    for tiled in (False, True):
        fn = ContrastiveLoss(0.07, learnable=learnable, tiled=tiled, exclude_same_location=exclude, block_size=8)
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = fn(a, b, groups)
        loss.backward()
        out.append((loss, a.grad, b.grad, fn.log_scale.grad if learnable else None))
    (l0, a0, b0, s0), (l1, a1, b1, s1) = out
    assert rel_err(l1, l0) <= 1e-6
    assert rel_err(a1, a0) <= 1e-5 and rel_err(b1, b0) <= 1e-5
    if learnable:
        assert rel_err(s1, s0) <= 1e-5


def test_gradient_cache_matches_autograd():
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    info_nce(a, b).backward()
    loss, ga, gb = info_nce_and_grads(img, txt)
    assert torch.allclose(loss, info_nce(img, txt))
    assert torch.allclose(ga, a.grad, atol=1e-7) and torch.allclose(gb, b.grad, atol=1e-7)


@pytest.mark.parametrize("tiled", [False, True])
def test_bf16_inputs_give_fp32_loss(tiled):
    img = torch.randn(8, 4).bfloat16().requires_grad_()
    txt = torch.randn(8, 4).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(img, txt, tiled=tiled, block_size=3)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert img.grad.dtype == torch.bfloat16 and torch.isfinite(img.grad.float()).all()
    assert torch.allclose(loss, info_nce(img.float(), txt.float()), rtol=1e-5)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="equal shape"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="group_ids"):
        ContrastiveLoss(exclude_same_location=True)(torch.randn(4, 3), torch.randn(4, 3))


@pytest.mark.slow
def test_two_rank_gloo_equals_single_process(tmp_path):
    """torchrun 2 CPU ranks: loss and every parameter gradient equal one process (<= 1e-5)."""
    proc = run_torchrun(Path(__file__).parent / "dist_loss_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"ok-{rank}").read_text().strip() == "ok"


@pytest.mark.parametrize("tiled", [False, True])
def test_learnable_temperature_gradient_matches_reference(tiled):
    g = torch.Generator().manual_seed(9)
    img, txt = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    fn = ContrastiveLoss(0.2, learnable=True, tiled=tiled, block_size=5)
    loss = fn(img, txt)
    loss.backward()
    log_scale = torch.tensor(float(fn.log_scale.detach()), dtype=torch.float64, requires_grad=True)
    ref = reference_loss(img, txt, temperature=torch.exp(-log_scale))
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(fn.log_scale.grad, log_scale.grad) <= 1e-5
    assert fn.temperature == pytest.approx(0.2)


def test_learnable_scale_keeps_its_gradient_above_the_cap_and_is_clamped_after_the_step():
    """open_clip's rule: no clamp in the forward (past the cap its gradient would be 0 for
    good); the parameter is clamped in place after each optimizer step."""
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    fn = ContrastiveLoss(0.05, learnable=True)
    with torch.no_grad():
        fn.log_scale.fill_(math.log(MAX_SCALE) + 0.1)
    fn(img, txt).backward()
    log_scale = fn.log_scale.detach().double().requires_grad_()
    reference_loss(img, txt, torch.exp(-log_scale)).backward()
    assert float(log_scale.grad) != 0 and rel_err(fn.log_scale.grad, log_scale.grad) <= 1e-5
    torch.optim.SGD(fn.parameters(), lr=1e-6).step()
    assert float(fn.log_scale.detach()) > math.log(MAX_SCALE)  # still above the cap
    fn.clamp_scale_()
    assert float(fn.log_scale.detach()) == pytest.approx(math.log(MAX_SCALE))
    assert fn.temperature >= (1 - 1e-6) / MAX_SCALE


def test_a_fixed_temperature_is_used_as_given_and_a_learnable_one_starts_under_the_cap():
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    fn = ContrastiveLoss(0.005)  # scale 200: beyond the learnable cap, not clamped
    assert rel_err(fn(img, txt), reference_loss(img, txt, 0.005)) <= 1e-5
    fn.clamp_scale_()
    assert fn.temperature == pytest.approx(0.005)
    with pytest.raises(ValueError, match="learnable"):
        ContrastiveLoss(0.005, learnable=True)
