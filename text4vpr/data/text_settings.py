"""The text settings a model was trained with (max length, normalisation, tokenizer identity),
recorded in its folder and used by eval, index build and localize unless told otherwise."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from text4vpr.utils.errors import InputError
from text4vpr.utils.hashing import bytes_sha256

DEFAULT_MAX_TEXT_LENGTH = 128
DEFAULT_TEXT_NORMALIZATION = "whitespace"


class TextSettingsError(InputError, ValueError):
    """A model folder's text record is malformed."""


@dataclass(frozen=True, kw_only=True)
class TextSettings:
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH
    text_normalization: str = DEFAULT_TEXT_NORMALIZATION
    tokenizer: dict | None = None  # tokenizer_identity(): {"name", "vocab_size", "digest"}

    def record(self) -> dict:
        return asdict(self)


def tokenizer_identity(tokenizer) -> dict:
    """Name, size and a digest of the token -> id mapping and special tokens (not of the files,
    which `save_pretrained` may re-serialise differently for the same tokenizer)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    return {"name": name, "vocab_size": len(tokenizer),
            "digest": bytes_sha256(json.dumps([vocab, special], ensure_ascii=False).encode())}


def from_record(record, where: str) -> TextSettings:
    """A saved record, checked (a model folder is user input)."""
    if not isinstance(record, dict) or set(record) - {"max_text_length", "text_normalization", "tokenizer"}:
        raise TextSettingsError(f"{where}: malformed text settings record {record!r}")
    s = TextSettings(**record)
    if (not isinstance(s.max_text_length, int) or isinstance(s.max_text_length, bool) or s.max_text_length < 1
            or not isinstance(s.text_normalization, str) or not (s.tokenizer is None or isinstance(s.tokenizer, dict))):
        raise TextSettingsError(f"{where}: malformed text settings record {record!r}")
    return s


def resolve_text_settings(saved: TextSettings | None, max_text_length: int | None, text_normalization: str | None,
                          where: str) -> tuple[TextSettings, list[str]]:
    """The settings to tokenise with and the warnings to show: the saved ones unless a setting is
    given (a different one is a warning naming both); without a record, today's defaults (one warning)."""
    if saved is None:
        used = TextSettings(max_text_length=max_text_length or DEFAULT_MAX_TEXT_LENGTH,
                            text_normalization=text_normalization or DEFAULT_TEXT_NORMALIZATION)
        if max_text_length is not None and text_normalization is not None:
            return used, []  # both given: nothing left to guess
        return used, [f"{where} records no text settings (a model saved before they were recorded): tokenising with "
                      f"max_text_length={used.max_text_length}, text_normalization={used.text_normalization}; "
                      "pass --max-text-length / --text-normalization if it was trained otherwise"]
    warnings = []
    for name, given in (("max_text_length", max_text_length), ("text_normalization", text_normalization)):
        if given is not None and given != getattr(saved, name):
            warnings.append(f"{name}={given} given, but {where} was trained with {name}={getattr(saved, name)}; "
                            f"using {given}")
    used = TextSettings(
        max_text_length=max_text_length if max_text_length is not None else saved.max_text_length,
        text_normalization=text_normalization if text_normalization is not None else saved.text_normalization,
        tokenizer=saved.tokenizer,
    )
    return used, warnings


def tokenizer_warnings(saved: TextSettings | None, tokenizer, source: str, where: str) -> list[str]:
    """A warning when the tokenizer at `source` is not the one `where` was trained with."""
    if saved is None or saved.tokenizer is None:
        return []
    got = tokenizer_identity(tokenizer)
    if got["digest"] == saved.tokenizer.get("digest"):
        return []
    return [f"tokenizer {source} ({got['name']}, {got['vocab_size']} tokens) is not the one {where} was trained with "
            f"({saved.tokenizer.get('name')}, {saved.tokenizer.get('vocab_size')} tokens)"]
