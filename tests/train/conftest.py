"""Trainer fixtures: one cached synthetic dataset for all trainer tests."""

import pytest


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """Cache dir shared by trainer runs (synthetic data, shards and tokenizer made once)."""
    return tmp_path_factory.mktemp("train_cache")

