"""Nested mappings as flat {joined.key: value} (config comparison, tracker parameters)."""

from __future__ import annotations


def flatten(d: dict, sep: str = ".", prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1, "c": {}} (an empty mapping stays a value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, sep, key + sep))
        else:
            out[key] = v
    return out
