"""Text settings records: checked when read (a model folder is user input), resolved against flags."""

from __future__ import annotations

import itertools

import pytest

from text4vpr.data.text_settings import TextSettings, TextSettingsError, from_record, resolve_text_settings


@pytest.mark.parametrize("record", [
    "96", {"max_text_length": "96"}, {"max_text_length": -1}, {"max_text_length": True},
    {"max_text_length": 96, "extra": 1}, {"text_normalization": 3}, {"tokenizer": "t5"},
])
def test_malformed_records_are_one_error(record):
    with pytest.raises(TextSettingsError, match="malformed text settings"):
        from_record(record, "model m")


def test_resolution_against_a_naive_reference():
    saved = TextSettings(max_text_length=96, text_normalization="punkt", tokenizer={"digest": "d"})
    for length, norm in itertools.product((None, 96, 64), (None, "punkt", "whitespace")):
        used, warnings = resolve_text_settings(saved, length, norm, "model m")
        want = (96 if length is None else length, "punkt" if norm is None else norm)
        assert (used.max_text_length, used.text_normalization, used.tokenizer) == (*want, {"digest": "d"})
        differing = [n for n, g, s in (("max_text_length", length, 96), ("text_normalization", norm, "punkt"))
                     if g is not None and g != s]
        assert len(warnings) == len(differing) and all(n in w for n, w in zip(differing, warnings))


def test_no_record_uses_the_defaults_and_warns_unless_both_are_given():
    used, warnings = resolve_text_settings(None, None, None, "model m")
    assert (used.max_text_length, used.text_normalization) == (128, "whitespace") and len(warnings) == 1
    used, warnings = resolve_text_settings(None, 64, "whitespace", "model m")
    assert used.max_text_length == 64 and warnings == []
