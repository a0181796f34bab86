"""convert-upstream: a checkpoint in the upstream layout, generated here, round-trips."""

from __future__ import annotations

import pytest
import torch

from text4vpr.models import Text4VPR, tiny_config


def hub_dinov2_names(model: Text4VPR) -> dict:
    """Our DINOv2 weights under torch.hub names, qkv fused, inside the upstream wrapper `0.model.`."""
    sd = model.image_encoder.backbone.state_dict()
    out = {
        "cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
    }
    for i in range(len(model.image_encoder.backbone.encoder.layer)):
        b = f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{b}attention.{n}_proj.{leaf}"] for n in ("q", "k", "v")]
            )
            out[f"blocks.{i}.attn.proj.{leaf}"] = sd[f"{b}attention.o_proj.{leaf}"]
            for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"blocks.{i}.{m}.{leaf}"] = sd[f"{b}{m}.{leaf}"]
        out[f"blocks.{i}.ls1.gamma"] = sd[f"{b}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[f"{b}layer_scale2.lambda1"]
    return {"0.model." + k: v.clone() for k, v in out.items()}


def upstream_checkpoint(model: Text4VPR) -> dict:
    image = hub_dinov2_names(model)
    image.update({"1." + k: v.clone() for k, v in model.aggregation.state_dict().items()})
    image["1.tau"] = image["1.tau"].reshape(())  # upstream's tau is a 0-dim scalar parameter
    text = {"t5." + k: v.clone() for k, v in model.text_encoder.backbone.state_dict().items()}
    text.update({"inter_mlp." + k: v.clone() for k, v in model.text_encoder.projection.state_dict().items()})
    text.update({"inter_module." + k: v.clone() for k, v in model.text_encoder.layers.state_dict().items()})
    return {"image_encoder_state_dict": image, "text_encoder_state_dict": text, "epoch": 3}


@pytest.fixture()
def upstream_setup(tmp_path, tokenizer_dir):
    from text4vpr.data.tokenizer import load_tokenizer

    torch.manual_seed(7)
    model = Text4VPR(tiny_config(image_size=28)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and tau
        model.text_encoder.projection[1].running_mean.normal_()
        model.aggregation.tau.fill_(0.6)
    model.image_encoder.backbone.save_pretrained(tmp_path / "dinov2")
    model.text_encoder.backbone.save_pretrained(tmp_path / "t5")
    load_tokenizer(tokenizer_dir).save_pretrained(tmp_path / "t5")
    torch.save(upstream_checkpoint(model), tmp_path / "upstream.pth")
    return model, tmp_path


def test_convert_upstream_cli_round_trip(upstream_setup, capsys):
    from text4vpr.cli import main

    model, d = upstream_setup
    rc = main(["convert-upstream", str(d / "upstream.pth"), "--dinov2", str(d / "dinov2"),
               "--t5", str(d / "t5"), "--out", str(d / "out")])
    assert rc == 0, capsys.readouterr().err
    out = Text4VPR.from_pretrained(d / "out").eval()
    sa, sb = model.state_dict(), out.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 3, 28, 28)
    ids, mask = torch.randint(3, 300, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(out.encode_images(x), model.encode_images(x))
        assert torch.equal(out.encode_texts(ids, mask), model.encode_texts(ids, mask))
    assert (d / "out" / "tokenizer.json").exists()


def test_unmapped_and_missing_keys_are_listed(upstream_setup):
    from text4vpr.models.upstream import UpstreamConversionError, convert_upstream

    model, d = upstream_setup
    ckpt = upstream_checkpoint(model)
    ckpt["image_encoder_state_dict"]["0.model.register_tokens"] = torch.zeros(1, 4, 32)
    del ckpt["text_encoder_state_dict"]["inter_mlp.0.bias"]
    torch.save(ckpt, d / "bad.pth")
    with pytest.raises(UpstreamConversionError) as e:
        convert_upstream(d / "bad.pth", d / "dinov2", d / "t5")
    msg = str(e.value)
    assert "register_tokens" in msg and "text_encoder.projection.0.bias" in msg


def test_not_an_upstream_checkpoint(tmp_path):
    from text4vpr.models.upstream import UpstreamConversionError, load_upstream_checkpoint

    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(UpstreamConversionError, match="image_encoder_state_dict"):
        load_upstream_checkpoint(tmp_path / "x.pth")
