"""convert-upstream on checkpoints written by a re-creation of the published modules
(tests/models/upstream_recreation.py): every layout converts, and the converted model's
embeddings equal the published forward (fp32, eval mode)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from text4vpr.models import Text4VPR

_spec = importlib.util.spec_from_file_location("upstream_recreation", Path(__file__).with_name("upstream_recreation.py"))
recreation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recreation)

IMAGE_KEY, TEXT_KEY = "image_encoder_state_dict", "text_encoder_state_dict"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer_dir):
    """Published-structure modules, their backbone config folders, and the checkpoint layouts."""
    from text4vpr.data.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("upstream")
    image_encoder, text_encoder, dino_config, t5_config = recreation.build_published(seed=7)
    dino_config.save_pretrained(d / "dinov2")
    t5_config.save_pretrained(d / "t5")
    load_tokenizer(tokenizer_dir).save_pretrained(d / "t5")
    # the published train script: one dict; a DataParallel-wrapped run: `module.` prefixes;
    # the older published test script: one bare state_dict per encoder file
    torch.save({IMAGE_KEY: image_encoder.state_dict(), TEXT_KEY: text_encoder.state_dict()}, d / "combined.pth")
    torch.save({IMAGE_KEY: torch.nn.DataParallel(image_encoder).state_dict(),
                TEXT_KEY: torch.nn.DataParallel(text_encoder).state_dict()}, d / "dataparallel.pth")
    torch.save(image_encoder.state_dict(), d / "image.pth")
    torch.save(text_encoder.state_dict(), d / "text.pth")
    return image_encoder, text_encoder, d


def _convert(d, *names):
    from text4vpr.models.upstream import convert_upstream

    model, report = convert_upstream([d / n for n in names], d / "dinov2", d / "t5")
    return model.eval(), report


@pytest.mark.parametrize("pixels", [42, 56])  # 3x3 grid (table resized) and the table's own 4x4
def test_converted_model_reproduces_the_published_forward(published, pixels):
    image_encoder, text_encoder, d = published
    model, _ = _convert(d, "combined.pth")
    torch.manual_seed(pixels)
    images = torch.randn(5, 3, pixels, pixels)
    with torch.no_grad():
        ref = torch.cat([image_encoder(im[None]) for im in images])  # published: one image at a time
        ours = model.encode_images(images)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    print(f"image embeddings at {pixels}px: max rel diff {rel:.2e}")
    assert rel < 1e-4

    lengths = [3, 9, 5, 12, 1]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # real tokens then padding, as a batch of the loader
        ids[i, :n] = torch.randint(3, 300, (n,))
        mask[i, :n] = 1
    with torch.no_grad():  # published: one description at a time, so no padding
        ref_t = torch.cat([text_encoder(ids[i : i + 1, :n], mask[i : i + 1, :n]) for i, n in enumerate(lengths)])
        ours_t = model.encode_texts(ids, mask)
    diff = float((ours_t - ref_t).abs().max())
    print(f"text embeddings (batched, padded): max abs diff {diff:.2e} on values up to {float(ref_t.abs().max()):.2f}")
    assert diff < 1e-5


@pytest.mark.parametrize("files", [("dataparallel.pth",), ("image.pth", "text.pth"), ("text.pth", "image.pth")])
def test_every_published_layout_converts_to_the_same_model(published, files):
    _, _, d = published
    want = _convert(d, "combined.pth")[0].state_dict()
    got = _convert(d, *files)[0].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_cli_lists_the_dropped_unused_tensors(published, capsys):
    from text4vpr.cli import main

    _, text_encoder, d = published
    rc = main(["convert-upstream", str(d / "combined.pth"), "--dinov2", str(d / "dinov2"),
               "--t5", str(d / "t5"), "--out", str(d / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    unused = sorted(f"{TEXT_KEY}:{k}" for k in text_encoder.state_dict() if k.startswith("intra_module."))
    assert unused and json.loads((d / "out" / "conversion.json").read_text())["dropped_unused"] == unused
    assert f"dropped {len(unused)} upstream tensors" in out.out and "intra_module" in out.out
    saved = Text4VPR.from_pretrained(d / "out")
    live = _convert(d, "combined.pth")[0].state_dict()
    assert all(torch.equal(saved.state_dict()[k], live[k]) for k in live)
    assert (d / "out" / "tokenizer.json").exists()
    text = saved.text_settings  # the published preprocessing, recorded for eval and localize
    assert text["text_normalization"] == "punkt" and text["tokenizer"]["vocab_size"] > 0


def test_unmapped_and_missing_keys_are_listed(published, tmp_path):
    from text4vpr.models.upstream import UpstreamConversionError, convert_upstream

    image_encoder, text_encoder, d = published
    image, text = image_encoder.state_dict(), text_encoder.state_dict()
    image["0.model.register_tokens"] = torch.zeros(1, 4, 32)
    del text["inter_mlp.0.0.bias"]
    torch.save({IMAGE_KEY: image, TEXT_KEY: text}, tmp_path / "bad.pth")
    with pytest.raises(UpstreamConversionError) as e:
        convert_upstream(tmp_path / "bad.pth", d / "dinov2", d / "t5")
    msg = str(e.value)
    assert "register_tokens" in msg and "text_encoder.projection.0.bias" in msg


def test_missing_aggregation_head_is_named(published, tmp_path):
    from text4vpr.models.upstream import UpstreamConversionError, convert_upstream

    image_encoder, text_encoder, d = published
    image = {k: v for k, v in image_encoder.state_dict().items() if not k.startswith("1.score.")}
    torch.save({IMAGE_KEY: image, TEXT_KEY: text_encoder.state_dict()}, tmp_path / "headless.pth")
    with pytest.raises(UpstreamConversionError, match="1.score.0.weight"):
        convert_upstream(tmp_path / "headless.pth", d / "dinov2", d / "t5")


def test_not_an_upstream_checkpoint(tmp_path):
    from text4vpr.models.upstream import UpstreamConversionError, load_upstream_checkpoint

    torch.save({"state_dict": {}}, tmp_path / "x.pth")
    with pytest.raises(UpstreamConversionError, match="image_encoder_state_dict"):
        load_upstream_checkpoint(tmp_path / "x.pth")
    torch.save({"0.model.patch_embed.proj.weight": torch.zeros(2)}, tmp_path / "image.pth")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "y.pth")
    with pytest.raises(UpstreamConversionError, match="y.pth: not an upstream encoder"):
        load_upstream_checkpoint([tmp_path / "image.pth", tmp_path / "y.pth"])
    with pytest.raises(UpstreamConversionError, match="not the other upstream encoder"):
        load_upstream_checkpoint([tmp_path / "image.pth", tmp_path / "image.pth"])
