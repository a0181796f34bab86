"""normalize_images: ImageNet normalisation (docs/method.md#pixels) for uint8 or 0-255 float pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text4vpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images


def test_matches_the_spec_formula_and_masks_missing_views():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 4, 3, 5, 6), dtype=torch.uint8, generator=g)  # (B, V, 3, H, W)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    out = normalize_images(x, mask)
    ref = (x.double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    ref[0, 2] = 0
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), ref, atol=1e-5) and (out[0, 2] == 0).all()
    assert torch.equal(normalize_images(x.float(), mask), out)  # float input: same 0-255 pixel scale
    assert torch.equal(normalize_images(x[0, 1]), out[0, 1])  # any leading dims, (3, H, W) included
    assert x.dtype == torch.uint8 and torch.equal(normalize_images(x), normalize_images(x))  # input untouched


def test_large_batches_take_the_same_path_bits():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 4, 3, 64, 64), dtype=np.uint8))  # > 4 MB out
    small = torch.cat([normalize_images(x[i : i + 1]) for i in range(8)])
    assert torch.equal(normalize_images(x), small)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="3, H, W"):
        normalize_images(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError):
        normalize_images(torch.zeros(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="view_mask"):
        normalize_images(torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.bool))
