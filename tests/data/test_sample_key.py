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


def test_the_shard_reader_and_loader_do_not_import_the_xlsx_reader():
    import subprocess
    import sys

    code = ("import sys, text4vpr.data.shard_reader, text4vpr.data.loader, text4vpr.retrieval.index; "
            "print(sorted(m for m in sys.modules if m.endswith('street360loc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_split_names_of_annotation_files():
    from text4vpr.data.sample_key import split_name

    assert [split_name(p) for p in ("a/train_description.xlsx", "val_description.xlsx", "extra.xlsx")] == \
        ["train", "val", "extra"]
