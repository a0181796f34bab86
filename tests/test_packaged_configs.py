"""The run configs ship inside the package; the checkout's configs/ holds equal copies."""

from pathlib import Path

import pytest

from text4vpr.config import PACKAGED_CONFIGS, ConfigError, find_config
from text4vpr.train import resolve_config

REPO = Path(__file__).resolve().parents[1]


def test_checkout_copies_equal_the_packaged_configs():
    packaged = sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml"))
    assert packaged == ["demo.yaml", "street360loc.yaml", "tiny_test.yaml"]
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == packaged
    for name in packaged:
        assert (REPO / "configs" / name).read_bytes() == (PACKAGED_CONFIGS / name).read_bytes(), name


def test_names_resolve_to_packaged_configs_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as after `pip install .`
    for given in ("street360loc", "configs/street360loc.yaml", "street360loc.yaml"):
        assert find_config(given) == PACKAGED_CONFIGS / "street360loc.yaml"
    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 3\n")
    assert find_config("mine.yaml") == Path("mine.yaml")
    with pytest.raises(ConfigError, match=r"--config nope.yaml: no such file \(packaged configs: demo, street360loc, tiny_test"):
        find_config("nope.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        find_config("elsewhere/demo.yaml")  # a path that names another folder is not replaced


def test_default_is_the_packaged_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(None, [])
    assert cfg.data.synthetic.locations == 600 and cfg.train.output_dir == "runs/demo"
