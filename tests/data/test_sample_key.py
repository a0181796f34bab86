"""The one sample-key rule: written by the builder, read back by the reader, parsed for the index."""

from __future__ import annotations

import random

import pytest

from text4vpr.data.sample_key import key_index, member_key, sample_key


def test_key_round_trip_on_random_indices():
    rng = random.Random(0)
    for _ in range(200):
        split = rng.choice(["train", "val", "test", "my-split"])
        index = rng.randrange(0, 10**8)
        key = sample_key(split, index)
        assert "." not in key and key.startswith(split + "-")
        assert key_index(key) == index
        assert member_key(f"some/dir/{key}.3.jpg") == (key, "3.jpg")


@pytest.mark.parametrize("key", ["train", "train-12", "train-00001x", ""])
def test_keys_of_another_form_have_no_index(key):
    assert key_index(key) is None
