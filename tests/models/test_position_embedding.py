"""Position-embedding resize: the DINOv2 hub formula, checked against a float64 bicubic
written from it; the per-grid cache is invalidated by any change of the table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from text4vpr.models.position_embedding import HubPositionEmbedding, hub_resize


def cubic_weights_1d(n_in: int, n_out: int, scale_factor: float) -> torch.Tensor:
    """(n_out, n_in) float64 bicubic weights (A = -0.75, align_corners=False, edge clamp) for
    torch's interpolate given `scale_factor`: source x = (i + 0.5) / scale_factor - 0.5."""
    a = -0.75

    def k(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) / scale_factor - 0.5
        x0 = math.floor(x)
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += k(x - j)
    return w


def reference_hub_resize(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The dinov2 hub `interpolate_pos_encoding` formula, by hand in float64: (1, 1+M*M, C) -> (1, 1+h*w, C)."""
    m = math.isqrt(table.shape[1] - 1)
    if (h, w) == (m, m):
        return table.double()
    patch = table[0, 1:].double().reshape(m, m, -1)  # (M, M, C)
    wh = cubic_weights_1d(m, math.floor(m * (h + 0.1) / m), (h + 0.1) / m)  # (h, M)
    ww = cubic_weights_1d(m, math.floor(m * (w + 0.1) / m), (w + 0.1) / m)  # (w, M)
    out = torch.einsum("ip,pqc,jq->ijc", wh, patch, ww).reshape(1, h * w, -1)  # (1, h*w, C)
    return torch.cat((table[:, :1].double(), out), dim=1)


@pytest.mark.parametrize("pixels", [252, 224, 518, (252, 224)])
def test_hub_resize_matches_the_dinov2_formula(pixels):
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 8)  # the DINOv2 table of 518 px inputs
    h, w = (pixels, pixels) if isinstance(pixels, int) else pixels
    grid = (h // 14, w // 14)
    out = hub_resize(table, grid)
    ref = reference_hub_resize(table, *grid)
    assert out.shape == ref.shape == (1, 1 + grid[0] * grid[1], 8)
    assert (out.double() - ref).abs().max() < 5e-5  # float32 (as the hub code) vs float64
    if grid == (37, 37):
        assert out is table  # no interpolation at all when the grid matches
    else:  # the reference tells the hub formula from transformers' size=(h, w) resize
        patch = table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
        hf = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        hf = hf.permute(0, 2, 3, 1).reshape(1, -1, 8)
        assert (hf.double() - ref[:, 1:]).abs().max() > 1e-2


def test_cache_reuses_and_invalidates():
    torch.manual_seed(1)
    table = torch.nn.Parameter(torch.randn(1, 1 + 16, 4), requires_grad=False)
    cache = HubPositionEmbedding()
    calls = []
    real = F.interpolate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    F.interpolate = counting
    try:
        a = cache(table, (3, 3))
        assert cache(table, (3, 3)) is a and len(calls) == 1  # second step: nothing recomputed
        with torch.no_grad():
            table.add_(1.0)  # an optimizer step or load_state_dict changes it in place
        b = cache(table, (3, 3))
        assert len(calls) == 2
        assert torch.allclose(b.double(), reference_hub_resize(table.detach(), 3, 3), atol=5e-5)
        table.data = torch.randn(1, 1 + 16, 4)  # new storage
        c = cache(table, (3, 3))
        assert torch.allclose(c.double(), reference_hub_resize(table.detach(), 3, 3), atol=5e-5)
        d = cache(table.double(), (3, 3))
        assert d.dtype == torch.float64 and len(calls) == 4
    finally:
        F.interpolate = real


def test_inference_tensor_table_is_recomputed():
    """A model built under inference_mode has no version counter: no stale entry after an in-place change."""
    cache = HubPositionEmbedding()
    with torch.inference_mode():
        table = torch.randn(1, 1 + 16, 4)
        a = cache(table, (3, 3)).clone()
        table.add_(1.0)
        b = cache(table, (3, 3))
    assert torch.allclose(b.double(), reference_hub_resize(table, 3, 3), atol=5e-5)
    assert not torch.allclose(a, b)


def test_gradient_reaches_a_trainable_table():
    torch.manual_seed(2)
    table = torch.nn.Parameter(torch.randn(1, 1 + 16, 4, dtype=torch.float64))
    cache = HubPositionEmbedding()
    g = torch.randn(1, 1 + 9, 4, dtype=torch.float64)
    for _ in range(2):  # a second call must not return a stale, detached entry
        table.grad = None
        (cache(table, (3, 3)) * g).sum().backward()
        ref_table = table.detach().clone().requires_grad_(True)
        (reference_hub_resize(ref_table, 3, 3) * g).sum().backward()
        assert torch.allclose(table.grad, ref_table.grad, atol=1e-5)  # hub resizes in float32


def test_image_encoder_uses_the_hub_resize():
    """The model's tokens use the hub formula, cached: frozen tokens equal a hand-built embedding."""
    from text4vpr.models import Text4VPR, tiny_config

    torch.manual_seed(3)
    model = Text4VPR(tiny_config(image_size=56)).eval()  # 4x4 table
    enc = model.image_encoder
    emb = enc.backbone.embeddings
    x = torch.randn(2, 3, 42, 42)  # 3x3 grid
    with torch.no_grad():
        patches = emb.patch_embeddings(x)
        pos = reference_hub_resize(emb.position_embeddings, 3, 3).float()
        want = torch.cat((emb.cls_token.expand(2, -1, -1), patches), dim=1) + pos
        got = enc.embed(x)
    assert (got - want).abs().max() < 1e-5
    with torch.no_grad():
        hf = emb(x)  # transformers' own resize: must differ, or this test proves nothing
    assert (hf - want).abs().max() > 1e-3
