"""Fixtures of the data tests."""

import pytest

from text4vpr.data.shards import BuildOptions, build_shards


@pytest.fixture(scope="session")
def train_shards(synth_root, tmp_path_factory):
    """28 synthetic train locations in 6 uneven shards (max_count 5: 5,5,5,5,5,3)."""
    out = tmp_path_factory.mktemp("loader_shards")
    build_shards(synth_root / "train_description.xlsx", synth_root / "Street360Loc_images", out,
                 BuildOptions(max_count=5), progress=False, log=None)
    return out
