"""Run config: YAML + dotted overrides, strict keys and types, resolved config saved."""

import pytest
import yaml

from text4vpr.config import ConfigError, apply_overrides, load_config
from text4vpr.train import resolve_config
from text4vpr.train.config import RunConfig


def test_overrides_reach_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}, "data": {"loader": {"batch_size": 8}}}))
    cfg = load_config(RunConfig, path, ["optim.lr=0.5", "eval.ks=[1,3]", "data.loader.image_size=28"])
    assert cfg.train.epochs == 3
    assert cfg.data.loader.batch_size == 8
    assert cfg.data.loader.image_size == 28
    assert cfg.optim.lr == 0.5
    assert cfg.eval.ks == [1, 3]


@pytest.mark.parametrize(
    "override, key",
    [("train.epochz=3", "train.epochz"), ("data.loader.batchsize=3", "data.loader.batchsize"), ("nope.x=1", "nope")],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [override])


@pytest.mark.parametrize(
    "override, key", [("train.epochs=abc", "train.epochs"), ("optim.lr=[1]", "optim.lr"), ("train.cpu=3", "train.cpu")]
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["train.epochs"])


def test_shipped_configs_load():
    for name in ("demo", "street360loc", "tiny_test"):
        cfg = resolve_config(f"configs/{name}.yaml", [])
        assert isinstance(cfg, RunConfig)


def test_main_reports_bad_key(capsys):
    from text4vpr.cli.train import main

    assert main(["--config", "configs/tiny_test.yaml", "train.nonsense=1"]) == 2
    assert "train.nonsense" in capsys.readouterr().err


def test_yaml_exponent_without_dot_is_a_float():
    cfg = load_config(RunConfig, None, ["optim.lr=5e-3"])
    assert cfg.optim.lr == 0.005


def test_unknown_compile_mode_is_named():
    with pytest.raises(ConfigError, match=r"train\.compile_mode"):
        load_config(RunConfig, None, ["train.compile_mode=fastest"])
    assert load_config(RunConfig, None, ["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"


@pytest.mark.parametrize("override", [
    "train.mixed_precision=bf15", "train.frozen_cache_dtype=float8", "train.frozen_cache_device=tpu",
    "train.micro_batches=0", "eval.mode=nearest", "optim.schedule=linear",
    "train.cpu=true train.frozen_cache_device=cuda",
])
def test_bad_values_are_named_when_the_config_loads(override):
    """A typo in a value stops the run at load time (not at the first validation, an epoch in)."""
    key = override.split()[-1].split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, override.split())


def test_good_values_load():
    cfg = load_config(RunConfig, None, ["train.mixed_precision=no", "train.frozen_cache_device=cuda:1",
                                        "eval.mode=any-heading", "optim.schedule=constant", "train.micro_batches=4"])
    assert (cfg.train.mixed_precision, cfg.eval.mode, cfg.train.micro_batches) == ("no", "any-heading", 4)


def test_cuda_graphs_with_gradient_caching_are_refused():
    with pytest.raises(ConfigError, match=r"train\.compile_mode=reduce-overhead"):
        load_config(RunConfig, None, ["train.compile=true", "train.compile_mode=reduce-overhead", "train.micro_batches=2"])
    ok = load_config(RunConfig, None, ["train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs",
                                       "train.micro_batches=2"])
    assert ok.train.micro_batches == 2


def test_test_hooks_are_not_config_keys():
    """Faults are injected by the tests themselves (see test_trainer.py), not through the run config."""
    with pytest.raises(ConfigError, match=r"train\.nan_at_steps"):
        load_config(RunConfig, None, ["train.nan_at_steps=[1]"])
