"""Text normalisation and a small T5-style tokenizer trained locally on our own text.

The real setup loads the T5 tokenizer from a local Hugging Face folder; tests and the demo
train a tiny one here (no hub access), saved in the same `save_pretrained` layout.
"""

from __future__ import annotations

import os
from typing import Iterable, Literal

# T5 conventions: pad = 0, eos = 1, unk = 2.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


# "whitespace" (the default): collapse whitespace runs. "punkt": the published preprocessing
# (nltk sent_tokenize + " ".join), which needs the optional `upstream` extra. The default is
# not punkt so that results never depend on whether an optional package is installed.
TEXT_NORMALIZATIONS = ("whitespace", "punkt")
TextNormalization = Literal["whitespace", "punkt"]


def normalize_text(text: str, mode: TextNormalization = "whitespace") -> str:
    """One description as the encoder sees it.

    "whitespace": runs of whitespace (newlines, tabs, double spaces) become one space, ends
    stripped. "punkt": the published string, English punkt sentences joined with one space
    (differs from "whitespace" in 7 of the 24,008 real descriptions; docs/models.md).
    """
    if mode == "whitespace":
        return " ".join(str(text).split())
    if mode == "punkt":
        from text4vpr.data.sentences import join_sentences

        return join_sentences(text)
    raise ValueError(f"unknown text normalisation {mode!r} (expected one of: {' | '.join(TEXT_NORMALIZATIONS)})")


def check_text_normalization(mode: str, key: str = "text_normalization") -> None:
    """ConfigError naming `key` for an unknown mode, or for "punkt" without its package
    (checked when the config is made, not in a loader worker an epoch later)."""
    from text4vpr.config import ConfigError, check_choice

    check_choice(key, mode, TEXT_NORMALIZATIONS)
    if mode == "punkt":
        from text4vpr.data.sentences import MissingExtraError, require_punkt

        try:
            require_punkt()
        except MissingExtraError as e:
            raise ConfigError(f"{key}={mode}: {e}") from None


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None = None, vocab_size: int = 2000):
    """Train a WordPiece tokenizer with T5's special ids; return a PreTrainedTokenizerFast.

    The tokenizer appends `</s>` like T5's. When `out_dir` is given it is saved there with
    `save_pretrained`, so `AutoTokenizer.from_pretrained(out_dir)` loads it offline.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=50))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False
    )
    tok.train_from_iterator((normalize_text(t) for t in texts), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | os.PathLike, key: str = "tokenizer"):
    """Load a tokenizer from a local folder (never the hub); a missing or empty folder is a
    LocalFolderError naming `key`."""
    from transformers import AutoTokenizer

    from text4vpr.utils.local_folder import TOKENIZER_FILES, require_local_folder

    require_local_folder(key, path, TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
