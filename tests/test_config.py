"""Strict dataclass configs: nested sections, type checks, unknown keys, round trip to YAML."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from text4vpr.config import ConfigError, dump_yaml, from_dict, load_config


@dataclass
class Inner:
    size: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_nested_partial_mapping_keeps_defaults():
    cfg = from_dict(Outer, {"inner": {"rate": 2}})
    assert cfg.inner == Inner(size=3, rate=2.0) and isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize("data, key", [
    ({"inner": {"size": "3"}}, "inner.size"), ({"inner": {"mode": "c"}}, "inner.mode"),
    ({"inner": {"tags": [1]}}, r"inner.tags\[0\]"), ({"maybe": "no"}, "maybe"), ({"inner": 5}, "inner"),
])
def test_type_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(Outer, data)


def test_optional_accepts_none_and_value():
    assert from_dict(Outer, {"maybe": None}).maybe is None
    assert from_dict(Outer, {"maybe": 4}).maybe == 4


def test_yaml_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.tags=[p, q]", "name=run1", "inner.mode=b"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Outer, path) == cfg
    assert yaml.safe_load(path.read_text())["inner"]["tags"] == ["p", "q"]


@dataclass
class Words:
    precision: str = "bf16"
    flag: bool = False


def test_yaml_1_1_words_stay_strings_only_true_false_are_booleans(tmp_path):
    """`no`/`yes`/`on`/`off` are strings (Accelerate spells mixed precision `no`), in files and overrides."""
    path = tmp_path / "c.yaml"
    path.write_text("precision: no\nflag: true\n")
    assert load_config(Words, path) == Words(precision="no", flag=True)
    assert load_config(Words, None, ["precision=off", "flag=False"]) == Words(precision="off", flag=False)
    with pytest.raises(ConfigError, match="flag: expected true/false"):
        load_config(Words, None, ["flag=yes"])
    dumped = tmp_path / "dumped.yaml"  # round trip: what dump_yaml writes loads back the same
    dumped.write_text(dump_yaml(Words(precision="no", flag=True)))
    assert load_config(Words, dumped) == Words(precision="no", flag=True)
