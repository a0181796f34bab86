"""Retrieval fixtures: a tiny random-init model and its index of the synthetic test split."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Text4VPR (seed 0) saved with the test tokenizer."""
    from text4vpr.data.tokenizer import load_tokenizer
    from text4vpr.models import Text4VPR, tiny_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    Text4VPR(tiny_config(vocab_size=300)).save_pretrained(out, tokenizer=load_tokenizer(tokenizer_dir))
    return out


@pytest.fixture(scope="session")
def index_dir(model_dir, synth_shards, tmp_path_factory):
    """`text4vpr index build` of `synth_shards` with `model_dir`. Read-only."""
    from text4vpr.cli import main

    out = tmp_path_factory.mktemp("index") / "idx"
    rc = main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(out),
               "--num-workers", "0", "--batch-size", "4"])
    assert rc == 0
    return out
