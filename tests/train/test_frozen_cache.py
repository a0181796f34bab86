"""Frozen-trunk cache: equal results to the uncached step, clear refusal when invalid."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.models import Text4VPR, tiny_config
from text4vpr.models.config import replace
from text4vpr.train import resolve_config
from text4vpr.train.frozen_cache import FrozenCacheError, FrozenTrunkCache
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def test_tokens_then_trained_blocks_equal_full_encoder():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50, image_size=28)
    model = Text4VPR(replace(cfg, image=replace(cfg.image, num_layers=3, trainable_blocks=1))).eval()
    images = torch.randint(0, 256, (3, 4, 3, 28, 28), dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        direct = model.encode_images(images, mask)
        tokens = model.frozen_image_tokens(images, mask)  # (B, V, 1 + hw, C)
        cached = model.encode_images_from_tokens(tokens, mask)
    assert tokens.shape == (3, 4, 1 + 4, 32)
    assert torch.count_nonzero(tokens[1, 1]) == 0  # missing view: nothing computed
    torch.testing.assert_close(cached, direct, rtol=1e-6, atol=1e-7)


def test_cache_refuses_when_nothing_is_frozen():
    cfg = tiny_config(vocab_size=50, image_size=28)
    model = Text4VPR(replace(cfg, image=replace(cfg.image, num_layers=2, trainable_blocks=2)))
    with pytest.raises(FrozenCacheError, match="nothing to cache"):
        FrozenTrunkCache(model, "cpu")


def _run(cache, out, *extra):
    args = [f"data.synthetic.cache_dir={cache}", f"train.output_dir={out}", "train.epochs=2", "eval.final=false",
            "model.config.image.num_layers=3", *extra]
    trainer = Trainer(resolve_config(str(REPO / "configs" / "tiny_test.yaml"), args))
    trainer.train()
    return trainer


def test_cached_training_equals_uncached(train_cache, tmp_path, monkeypatch):
    _run(train_cache, tmp_path / "plain")
    seen = []  # per cached-run batch: (every location cached already, any image decoded)
    step = Trainer.step

    def spy(self, batch):
        seen.append((self.frozen_cache.covers(batch["index"].tolist()), bool(batch["images"].any())))
        return step(self, batch)

    monkeypatch.setattr(Trainer, "step", spy)
    cached = _run(train_cache, tmp_path / "cached", "train.frozen_cache=true")
    stats = cached.frozen_cache.stats()
    assert stats["hits"] > 0 and stats["misses"] == stats["locations"] > 0
    # epoch 2's batches are all hits and arrive without decoded images; epoch 1 decoded them
    assert (True, False) in seen and (False, True) in seen and (True, True) not in seen
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model" / "model.safetensors")
    for k in a:
        assert torch.equal(b[k], a[k]), k  # bitwise: the same ops on the same rows


def test_gather_rows_copies_each_row_across_devices():
    from text4vpr.train.frozen_cache import gather_rows

    rows = [torch.randn(4, 5, 6) for _ in range(3)]
    same = gather_rows(rows, torch.device("cpu"))
    assert torch.equal(same, torch.stack(rows))
    other = gather_rows(rows, torch.device("meta"))  # another device: the per-row copy path
    assert other.device.type == "meta" and other.shape == (3, 4, 5, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_host_cache_is_pinned_and_gives_the_same_tokens():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50, image_size=28)
    model = Text4VPR(replace(cfg, image=replace(cfg.image, num_layers=3, trainable_blocks=1))).cuda().eval()
    batch = {"images": torch.randint(0, 256, (3, 4, 3, 28, 28), dtype=torch.uint8, device="cuda"),
             "view_mask": torch.ones(3, 4, dtype=torch.bool, device="cuda")}
    cache = FrozenTrunkCache(model, "cpu")
    first = cache.tokens(batch, [7, 8, 9])
    assert all(t.is_pinned() for t in cache.store.values())
    assert len({t.untyped_storage().data_ptr() for t in cache.store.values()}) == 1  # one page-locked block
    again = cache.tokens(batch, [9, 7, 8])  # all hits, copied from host memory
    assert again.device.type == "cuda" and cache.hits == 3
    assert torch.equal(again, first[[2, 0, 1]])
    torch.testing.assert_close(first, model.frozen_image_tokens(batch["images"], batch["view_mask"]))
