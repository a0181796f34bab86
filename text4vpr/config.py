"""Dataclass configs: YAML files plus dotted command-line overrides, strictly checked.

Each component defines its own dataclass beside its code; the trainer nests them. Unknown
keys and values of the wrong type are errors that name the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from text4vpr.utils.errors import InputError

T = TypeVar("T")

BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans, so `no`, `on`, `yes`
    and `off` stay strings (`train.mixed_precision=no`, Accelerate's spelling, is a string)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != BOOL_TAG]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader, node, deep=False):
    """A YAML mapping; a key given twice is an error (PyYAML keeps the last one silently)."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (lines {seen[key] + 1} and {mark.line + 1})", mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _mapping_without_duplicates


def _load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(InputError, ValueError):
    """A config key is unknown, or its value has the wrong type."""


def check_choice(key: str, value, options) -> None:
    """ConfigError naming `key` unless `value` is one of `options` (checked when the config loads,
    not when the value is first used, perhaps an epoch into a run)."""
    if value not in options:
        raise ConfigError(f"{key}: unknown value {value!r} (expected one of: {' | '.join(map(str, options))})")


def check_range(key: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """ConfigError naming `key` unless low <= value <= high (`*_open`: strict); None bounds are open-ended."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ConfigError(f"{key}: {value!r} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})")


def check_each(key: str, values, low=None, high=None, low_open: bool = False) -> None:
    """`check_range` on every item of a non-empty list (`key[i]` in the message)."""
    if not values:
        raise ConfigError(f"{key}: must not be empty")
    for i, v in enumerate(values):
        check_range(f"{key}[{i}]", v, low, high, low_open)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type hint `tp`; convert where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """float (ints and YAML-1.1 exponent strings accepted), int, bool, str, other classes."""
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if not math.isfinite(value):  # no setting of this package means anything at nan or inf
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: "
            + ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
            + f" (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = _load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the wheel


def find_config(path: str | Path) -> Path:
    """`path` when it is a file; else the packaged config of that name (`street360loc`,
    `configs/street360loc.yaml`), so README commands work from an installed wheel too."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if packaged.is_file() and (len(p.parts) == 1 or p.parent.name == "configs"):
        return packaged
    names = ", ".join(sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"--config {path}: no such file (packaged configs: {names}; pass a YAML path or one of those names)")


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Defaults of `cls`, updated by the YAML file at `path`, then by dotted overrides."""
    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(path)
        try:
            from_dict(cls, data)  # the file alone: its own mistakes are reported as the file's
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"command line ({' '.join(overrides)}): {e}") from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; ConfigError naming the file and line when it is not one."""
    try:
        with open(path) as f:
            loaded = _load_yaml(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data:, model:, train:, ...)")
    return loaded


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
