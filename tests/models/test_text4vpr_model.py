"""Two-tower model: shapes, masking, batched == single, freezing, I/O, bf16."""

from __future__ import annotations

import json

import pytest
import torch

from text4vpr.models import ModelConfig, Text4VPR, tiny_config
from text4vpr.models.config import replace


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Text4VPR(tiny_config(image_size=28))


def text_batch(tokenizer_dir, texts):
    from text4vpr.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    enc = tok(texts, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_shapes_and_missing_views(model):
    model.eval()
    images = torch.randn(2, 4, 3, 28, 42)  # any multiple of the 14 px patch
    view_mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    ids = torch.randint(3, 300, (2, 4, 10))
    mask = torch.ones_like(ids)
    mask[0, 2] = 0
    img, txt = model(images, view_mask, ids, mask)
    assert img.shape == txt.shape == (2, 4, model.embed_dim)
    assert torch.allclose(img[view_mask].norm(dim=-1), torch.ones(7))
    assert (img[0, 2] == 0).all() and (txt[0, 2] == 0).all()
    assert torch.allclose(model.encode_images(images[1]), img[1], atol=1e-6)  # (N, 3, H, W) form


def test_bad_image_size_is_an_error(model):
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.encode_images(torch.randn(1, 3, 30, 28))


def test_batched_text_equals_one_at_a_time(model, tokenizer_dir):
    texts = ["a red car by the curb", "I'm sorry, I can't assist with that.",
             "From left to right: 1. a tall green tree 2. a grey building with many windows"]
    ids, mask = text_batch(tokenizer_dir, texts)
    model.eval()
    with torch.no_grad():
        batched = model.encode_texts(ids, mask)  # (3, D)
        for n in range(3):
            length = int(mask[n].sum())
            alone = model.encode_texts(ids[n : n + 1, :length], mask[n : n + 1, :length])  # no padding at all
            assert torch.allclose(batched[n], alone[0], atol=1e-5, rtol=1e-5)
        # padding content never matters
        noisy = ids.clone()
        noisy[mask == 0] = 7
        assert torch.allclose(model.encode_texts(noisy, mask), batched, atol=1e-6)


def test_frozen_blocks_get_no_grad_trainable_ones_do(model):
    model.train()
    model.zero_grad(set_to_none=True)
    img = model.encode_images(torch.randn(2, 3, 28, 28))
    txt = model.encode_texts(torch.randint(3, 300, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    (img.sum() + txt.sum()).backward()
    backbone = model.image_encoder.backbone
    frozen = [backbone.embeddings, backbone.encoder.layer[0], backbone.layernorm]
    assert all(not p.requires_grad and p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in backbone.encoder.layer[1].parameters())
    assert all(p.grad is not None for p in model.aggregation.parameters())
    names = {n for n, _ in model.backbone_named_parameters()}
    assert "image_encoder.backbone.encoder.layer.1.mlp.fc1.weight" in names
    assert not any(n.startswith("image_encoder.backbone.encoder.layer.0.") for n in names)
    groups = {g["name"]: g for g in model.parameter_groups(1e-3, weight_decay=0.1, backbone_lr_mult=0.1)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head_no_decay"]["weight_decay"] == 0.0
    assert any(p is model.aggregation.tau for p in groups["head_no_decay"]["params"])


def test_gradient_checkpointing_gives_same_grads():
    cfg = tiny_config(image_size=28)
    torch.manual_seed(1)
    a = Text4VPR(cfg).eval()
    b = Text4VPR(replace(cfg, image=replace(cfg.image, gradient_checkpointing=True))).eval()
    b.load_state_dict(a.state_dict())
    b.train()
    b.aggregation.eval()  # no dropout, checkpointing still on (train mode of the backbone)
    x = torch.randn(2, 3, 28, 28)
    a.encode_images(x).square().sum().backward()
    b.encode_images(x).square().sum().backward()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n, p in pa.items():
        if p.grad is not None:
            assert torch.allclose(p.grad, pb[n].grad, atol=1e-6), n


def test_freeze_projection_at_init_reproduces_upstream(tokenizer_dir):
    cfg = tiny_config()
    cfg = replace(cfg, text=replace(cfg.text, freeze_projection_at_init=True))
    m = Text4VPR(cfg).train()
    proj = m.text_encoder.projection
    before = {k: v.clone() for k, v in proj.state_dict().items()}
    ids, mask = text_batch(tokenizer_dir, ["a red car", "a tall tree by a building"])
    m.encode_texts(ids, mask).sum().backward()
    assert not proj.training and all(p.grad is None for p in proj.parameters())
    assert all(torch.equal(before[k], v) for k, v in proj.state_dict().items())  # running stats untouched


def test_save_from_pretrained_bit_exact(model, tmp_path, tokenizer_dir):
    from text4vpr.data.tokenizer import load_tokenizer

    model.eval()
    model.save_pretrained(tmp_path / "m", tokenizer=load_tokenizer(tokenizer_dir))
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith(".tmp") for f in files)
    loaded = Text4VPR.from_pretrained(tmp_path / "m").eval()
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.config_hash() == model.config_hash()
    x = torch.randn(1, 2, 3, 28, 28)
    ids, mask = torch.randint(3, 300, (1, 2, 8)), torch.ones(1, 2, 8, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model.encode_images(x), loaded.encode_images(x))
        assert torch.equal(model.encode_texts(ids, mask), loaded.encode_texts(ids, mask))
    load_tokenizer(tmp_path / "m")  # the folder is also a tokenizer folder


def test_hf_folders_load_offline_and_saved_model_is_self_contained(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, T5Config, T5EncoderModel

    torch.manual_seed(3)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=56, patch_size=14))
    t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2))
    dino.save_pretrained(tmp_path / "dinov2")
    t5.save_pretrained(tmp_path / "t5")
    base = tiny_config()
    cfg = ModelConfig(image=replace(base.image, pretrained=str(tmp_path / "dinov2")),
                      aggregation=base.aggregation, text=replace(base.text, pretrained=str(tmp_path / "t5")),
                      embed_dim=base.embed_dim)
    m = Text4VPR(cfg)
    assert torch.equal(m.image_encoder.backbone.encoder.layer[1].mlp.fc1.weight, dino.encoder.layer[1].mlp.fc1.weight)
    assert torch.equal(m.text_encoder.backbone.shared.weight, t5.shared.weight)
    m.save_pretrained(tmp_path / "ours")
    assert str(tmp_path) not in (tmp_path / "ours" / "config.json").read_text()
    for sub in ("dinov2", "t5"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
    again = Text4VPR.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.text_encoder.backbone.shared.weight, t5.shared.weight)
    assert again.config_hash() == m.config_hash()
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["config"]["image"]["backbone_config"]["hidden_size"] == 32


def test_bf16_autocast_forward_backward_no_nan(model, tokenizer_dir):
    from text4vpr.losses import info_nce

    model.train()
    model.zero_grad(set_to_none=True)
    ids, mask = text_batch(tokenizer_dir, ["a red car", "a tall tree", "a bus", "a sign"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = model.encode_images(torch.randn(4, 3, 28, 28))
        txt = model.encode_texts(ids, mask)
        loss = info_nce(img, txt)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_config_validation():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="embed_dim"):
        replace(cfg, embed_dim=63)
    with pytest.raises(ValueError, match="trainable_blocks"):
        Text4VPR(replace(cfg, image=replace(cfg.image, trainable_blocks=5)))


def test_text_dropout_override_makes_training_deterministic():
    import dataclasses

    from text4vpr.models import Text4VPR, tiny_config

    cfg = tiny_config(vocab_size=50, image_size=28)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dropout=0.0, residual_dropout=0.0))
    model = Text4VPR(cfg).train()
    ids = torch.randint(3, 50, (2, 4, 7))
    mask = torch.ones_like(ids)
    a = model.encode_texts(ids, mask)
    b = model.encode_texts(ids, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    default = Text4VPR(tiny_config(vocab_size=50, image_size=28)).train()
    assert not torch.equal(default.encode_texts(ids, mask), default.encode_texts(ids, mask))


def test_uint8_images_are_normalised_by_the_model():
    from text4vpr.data.transforms import normalize_images
    from text4vpr.models import Text4VPR, tiny_config

    model = Text4VPR(tiny_config(vocab_size=50, image_size=28)).eval()
    raw = torch.randint(0, 256, (2, 4, 3, 28, 28), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(raw, mask), model.encode_images(normalize_images(raw), mask))


def test_forward_compiles_without_graph_breaks():
    """torch.compile sees one graph when the trainer says every view is present."""
    import torch._dynamo

    from text4vpr.models import Text4VPR, tiny_config

    model = Text4VPR(tiny_config(vocab_size=50, image_size=28)).train()
    images = torch.randint(0, 256, (2, 4, 3, 28, 28), dtype=torch.uint8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    ids = torch.randint(3, 50, (2, 4, 9))
    explanation = torch._dynamo.explain(model)(images, mask, ids, torch.ones_like(ids), views_complete=True)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_forward_does_not_recompile_on_the_next_step():
    """A second step with the same shapes reuses the graph (no guard on module-level caches)."""
    import torch._dynamo

    from text4vpr.data import transforms
    from text4vpr.models import Text4VPR, tiny_config

    torch._dynamo.reset()
    transforms._CONSTANTS.clear()  # the state a fresh process starts from
    model = Text4VPR(tiny_config(vocab_size=50, image_size=28)).train()
    compiled = torch.compile(model, backend="eager")  # dynamo's guards without inductor's compile time
    images = torch.randint(0, 256, (2, 4, 3, 28, 28), dtype=torch.uint8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    ids = torch.randint(3, 50, (2, 4, 9))
    compiled(images, mask, ids, torch.ones_like(ids), views_complete=True)
    transforms.normalize_images(images)  # eager use fills the cache, as the loader or a cache fill would
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(images, mask, ids, torch.ones_like(ids), views_complete=True)
    torch._dynamo.reset()
