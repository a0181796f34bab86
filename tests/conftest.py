"""Shared fixtures: everything is generated locally (tokenizer, data, models); no hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_TEXTS = [
    "From left to right, the main features include: 1. a red car parked by the curb "
    "2. a tall green tree 3. a grey building with many windows 4. a blue street sign.",
    "From left to right, the features are: 1. a white lamp post 2. a yellow bus "
    "3. a brick building 4. an orange traffic cone on the sidewalk under a cloudy sky.",
    "I'm sorry, I can't assist with that.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny WordPiece tokenizer with T5 special ids, saved in Hugging Face layout."""
    from text4vpr.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TOKENIZER_TEXTS * 4, out, vocab_size=300)
    return out
