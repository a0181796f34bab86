"""Text normalisation against the published preprocessing (nltk sent_tokenize + " ".join)
on the real Street360Loc descriptions; the optional-package error; the loader and localize plumbing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from text4vpr.cli import main
from text4vpr.config import ConfigError, from_dict
from text4vpr.data import sentences
from text4vpr.data.loader import LoaderConfig, build_loader
from text4vpr.data.shards import build_shards
from text4vpr.data.tokenizer import load_tokenizer, normalize_text
from text4vpr.models import Text4VPR, tiny_config
from text4vpr.retrieval.localize import encode_descriptions

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "street360loc"  # ../shared beside the clone

# The published strings for the 7 real descriptions where whitespace normalisation differs, keyed
# (file, index, pos). Obtained with nltk 3.10.4 itself: nltk.tokenize.punkt.PunktSentenceTokenizer
# with the English punkt_tab parameters (abbrev_types, collocations, sent_starters, ortho_context),
# then " ".join(sentences) as the published LanguageEncoder does; nltk 3.8.1 and 3.9.1 give the
# same strings. The first 5 carry the space punkt inserts between a sentence end and following
# punctuation; the last 2 keep a double space inside a sentence.
PUBLISHED = {
    ("train", 1532, 3): (
        'From left to right, the four main features are: 1. The red-brick building with multiple '
        "floors and windows. 2. A large black awning with a circular logo. 3. The establishment's "
        'name "Blush" in stylized font. 4. An illuminated sign displaying "LET\'S GO PENS!!! ".'
    ),
    ("train", 1980, 3): (
        'From left to right, the features are: **1. A bright blue sky with fluffy white clouds,** '
        '**2. A steep, green hillside,** **3. Tents and structures in a lower area beside the '
        'water,** **4. A bridge railing with cables extending vertically. **'
    ),
    ("train", 2468, 4): (
        "I'm unable to view the image, but I can help you understand how to describe features for "
        'computer vision localization tasks. Generally, you can approach it by identifying items like'
        ' landmarks, shapes, colors, and text, and then format it as follows:"From left to right, 1. '
        '[Feature description], 2. [Feature description], 3. [Feature description], 4. [Feature '
        'description]. "Feel free to provide details about the image, and I can help you craft a '
        'description!'
    ),
    ("train", 2756, 1): (
        'From left to right, the four main features are: 1. A street lamp with a rounded top; 2. '
        'Storefront with a sign indicating "HERE! "; 3. Domino\'s Pizza storefront with a "GRAND '
        'OPENING!" banner; 4. People walking along the sidewalk.'
    ),
    ("train", 5293, 4): (
        'From left to right, the four main features are: 1. A red-brick corner building with large '
        'windows; 2. A blue restaurant façade featuring "A.O.C. "; 3. Several parked vehicles along '
        'the street; 4. Lush green trees lining the road.'
    ),
    ("train", 5956, 2): (
        'From left to right, the four main features are: 1. Decorative streetlight pole  2. Traffic '
        'signal with green light 3. Multi-story building with glass facade 4. An auto glass shop with'
        ' a sign on the right'
    ),
    ("val", 4831, 3): (
        'From left to right, the features are: 1. A blue car parked on the street,  2. A white van,  '
        '3. A row of lush green trees providing shade, 4. A high-rise building with a reflective '
        'facade in the background.'
    ),
}
INSERTED_SPACE = list(PUBLISHED)[:5]


@pytest.fixture(scope="module")
def real_descriptions() -> dict[tuple[str, int, int], str]:
    """Every real description keyed (file, index, pos)."""
    if not REAL.is_dir():  # CI lays ../shared beside the clone; elsewhere these tests cannot run
        pytest.skip(f"needs the real Street360Loc annotations in {REAL}")
    out = {}
    for split in ("train", "val"):
        frame = pd.read_excel(REAL / f"{split}_description.xlsx")
        for index, pos, text in zip(frame["index"], frame["pos"], frame["text_description"]):
            if isinstance(text, str):
                out[(split, int(index), int(pos))] = text
    return out


def test_punkt_gives_the_published_string_where_whitespace_does_not(real_descriptions):
    for key, published in PUBLISHED.items():
        text = real_descriptions[key]
        assert normalize_text(text, "punkt") == published, key
        assert normalize_text(text) != published, key
        inserted = " ".join(published.split()) != normalize_text(text)
        assert inserted == (key in INSERTED_SPACE), key


@pytest.mark.slow
def test_modes_differ_on_exactly_those_descriptions(real_descriptions):
    """On the other 24,001 descriptions nltk's string equals the whitespace one (measured with
    nltk, docs/models.md), so punkt mode must equal it there too (~10 s: every description)."""
    assert len(real_descriptions) == 24008
    differ = {k for k, t in real_descriptions.items() if normalize_text(t, "punkt") != normalize_text(t)}
    assert differ == set(PUBLISHED)


@pytest.fixture
def without_punkt(monkeypatch):
    """`import punkt` fails, as where the optional package is not installed."""
    monkeypatch.setitem(sys.modules, "punkt", None)
    sentences._english_tokenizer.cache_clear()
    yield
    sentences._english_tokenizer.cache_clear()


def test_missing_package_is_a_one_line_error_naming_the_extra(without_punkt):
    with pytest.raises(sentences.MissingExtraError, match=r"pip install 'text4vpr\[upstream\]'"):
        normalize_text("One. Two.", "punkt")
    with pytest.raises(ConfigError, match=r"text_normalization=punkt: .*text4vpr\[upstream\]"):
        LoaderConfig(text_normalization="punkt")
    assert normalize_text(" One.  Two. ") == "One. Two."  # the default needs nothing


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="text_normalization"):
        from_dict(LoaderConfig, {"text_normalization": "nltk"})
    with pytest.raises(ConfigError, match="text_normalization: unknown value 'nltk'"):
        LoaderConfig(text_normalization="nltk")
    with pytest.raises(ValueError, match="unknown text normalisation"):
        normalize_text("x", "nltk")
    assert LoaderConfig().text_normalization == "whitespace"


@pytest.mark.parametrize("mode", ["whitespace", "punkt"])
def test_loader_tokenises_the_configured_normalisation(synth_root, tmp_path, tokenizer_dir, mode):
    """A shard holding a real description: the batch's ids are the tokenizer's ids of that
    description normalised in the configured mode (and the two modes give different ids)."""
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    xlsx = root / "test_description.xlsx"
    frame = pd.read_excel(xlsx)
    text = PUBLISHED[INSERTED_SPACE[0]].replace("PENS!!! \".", "PENS!!!\".")  # the real description
    frame.loc[0, "text_description"] = text
    frame.to_excel(xlsx, index=False)
    build_shards(xlsx, root / "Street360Loc_images", tmp_path / "s", progress=False, log=None)
    cfg = LoaderConfig(shards=str(tmp_path / "s"), tokenizer=str(tokenizer_dir), batch_size=8, image_size=32,
                       num_workers=0, max_text_length=400, text_normalization=mode)
    batch = next(iter(build_loader(cfg, "eval")))
    row, view = batch["index"].tolist().index(int(frame.loc[0, "index"])), int(frame.loc[0, "pos"]) - 1
    tok = load_tokenizer(tokenizer_dir)
    ids = {m: tok(normalize_text(text, m), padding="max_length", truncation=True, max_length=400)["input_ids"]
           for m in ("whitespace", "punkt")}
    assert ids["whitespace"] != ids["punkt"]
    assert batch["input_ids"][row, view].tolist() == ids[mode]


@pytest.fixture(scope="module")
def tiny_model(tokenizer_dir):
    torch.manual_seed(0)
    return Text4VPR(tiny_config(vocab_size=300)).eval(), load_tokenizer(tokenizer_dir)


def test_localize_encodes_the_configured_normalisation(tiny_model):
    model, tok = tiny_model
    raw, published = 'A sign: "HERE!"; a tree.', 'A sign: "HERE! "; a tree.'  # as nltk's sent_tokenize + join
    got, _ = encode_descriptions(model, tok, [raw], text_normalization="punkt")
    ref, _ = encode_descriptions(model, tok, [published])
    plain, _ = encode_descriptions(model, tok, [raw])
    assert torch.equal(got, ref) and not torch.equal(got, plain)


def test_cli_flags_reach_the_normalisation(tiny_model, tmp_path, capsys, without_punkt):
    """Without the package, `--text-normalization punkt` stops localize and eval with the
    one-line error naming the extra (so the flag reached the query texts and the loader)."""
    model, tok = tiny_model
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    for argv in (["localize", "--model", str(tmp_path / "m"), "--index", str(tmp_path / "none"), "--text", "a"],
                 ["eval", "--model", str(tmp_path / "m"), "--shards", str(tmp_path / "none"), "--out",
                  str(tmp_path / "r")]):
        assert main(argv + ["--text-normalization", "punkt"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'text4vpr[upstream]'" in err, err
