"""A model folder records the text settings it was trained with; eval, index build and
localize tokenise with them unless told otherwise (then a warning names both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from text4vpr.config import load_config
from text4vpr.train.config import RunConfig
from text4vpr.train.data import synthetic_root
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_96(train_cache, tmp_path_factory):
    """A one-step run whose loader tokenises at 96 (the tiny config's default is 64)."""
    out = tmp_path_factory.mktemp("text96") / "run"
    cfg = load_config(RunConfig, REPO / "configs" / "tiny_test.yaml",
                      [f"data.synthetic.cache_dir={train_cache}", f"train.output_dir={out}", "train.max_steps=1",
                       "data.loader.max_text_length=96", "eval.final=false", "eval.every_steps=1000"])
    Trainer(cfg).train()
    return out, synthetic_root(cfg.data) / "shards" / "test"


@pytest.fixture
def widths(monkeypatch):
    """The padded token width of every batch the CLI's loader yields."""
    import text4vpr.data.loader as loader

    seen, build = [], loader.build_loader

    def spy(cfg, *a, **kw):
        for batch in build(cfg, *a, **kw):
            seen.append(batch["input_ids"].shape[-1])
            yield batch
    monkeypatch.setattr(loader, "build_loader", spy)
    return seen


def _eval(model, shards, out, *extra) -> int:
    from text4vpr.cli import main

    return main(["eval", "--model", str(model), "--shards", str(shards), "--out", str(out), "--num-workers", "0",
                 "--no-progress", *extra])


def test_the_model_folder_records_the_training_text_settings(run_96):
    from text4vpr.data.text_settings import tokenizer_identity
    from text4vpr.data.tokenizer import load_tokenizer

    run, _ = run_96
    text = json.loads((run / "model" / "config.json").read_text())["text"]
    assert (text["max_text_length"], text["text_normalization"]) == (96, "whitespace")
    saved = tokenizer_identity(load_tokenizer(run / "model"))  # the same mapping as the run's tokenizer
    assert (text["tokenizer"]["digest"], text["tokenizer"]["vocab_size"]) == (saved["digest"], saved["vocab_size"])


def test_eval_tokenises_as_the_model_was_trained(run_96, widths, tmp_path, capsys):
    run, shards = run_96
    assert _eval(run / "model", shards, tmp_path / "r") == 0
    assert widths and set(widths) == {96}
    assert "warning" not in capsys.readouterr().err


def test_another_explicit_length_is_used_with_a_warning_naming_both(run_96, widths, tmp_path, capsys):
    run, shards = run_96
    assert _eval(run / "model", shards, tmp_path / "r", "--max-text-length", "128") == 0
    assert set(widths) == {128}
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "max_text_length=128 given" in err and "max_text_length=96" in err


def test_another_tokenizer_is_a_warning(run_96, widths, tmp_path, capsys):
    from text4vpr.data.tokenizer import train_tokenizer

    run, shards = run_96
    other = tmp_path / "tok"
    train_tokenizer(["a b c d e f g"] * 10, other, vocab_size=40)
    assert _eval(run / "model", shards, tmp_path / "r", "--tokenizer", str(other)) == 0
    err = capsys.readouterr().err
    assert f"tokenizer {other}" in err and "is not the one" in err


def test_a_folder_without_a_record_uses_the_defaults_with_one_warning(run_96, widths, tmp_path, capsys):
    import shutil

    run, shards = run_96
    old = tmp_path / "old"
    shutil.copytree(run / "model", old)
    meta = json.loads((old / "config.json").read_text())
    del meta["text"]
    (old / "config.json").write_text(json.dumps(meta))
    assert _eval(old, shards, tmp_path / "r") == 0
    assert set(widths) == {128}
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "records no text settings" in err


def test_localize_encodes_at_the_recorded_length(run_96, monkeypatch):
    import torch

    from text4vpr.data.tokenizer import load_tokenizer
    from text4vpr.models import Text4VPR
    from text4vpr.retrieval.localize import encode_descriptions

    run, _ = run_96
    model = Text4VPR.from_pretrained(run / "model")
    seen = []
    encode = model.encode_texts
    monkeypatch.setattr(model, "encode_texts", lambda ids, att: seen.append(ids.shape[-1]) or encode(ids, att))
    with torch.no_grad():
        encode_descriptions(model, load_tokenizer(run / "model"), ["a red door"])
    assert seen == [96]
