"""The trainer refuses val/test shards that share locations with its train shards (issue 15 #1:
a val folder built from train + val xlsx validated, and chose the best model, on training data)."""

from pathlib import Path

import pytest

from text4vpr.data.shards import BuildOptions, build_shards
from text4vpr.train import resolve_config
from text4vpr.train.data import DataPaths, SplitOverlapError, check_split_overlap, location_ids
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split_shards(synth_root, tmp_path_factory):
    """train (28 locations), a leaky val built from train + val xlsx (34), a clean val (6)."""
    out = tmp_path_factory.mktemp("split_shards")
    images = synth_root / "Street360Loc_images"
    xlsx = {s: synth_root / f"{s}_description.xlsx" for s in ("train", "val")}
    for name, inputs in (("train", xlsx["train"]), ("leaky_val", [xlsx["train"], xlsx["val"]]), ("val", xlsx["val"])):
        build_shards(inputs, images, out / name, BuildOptions(max_count=8), progress=False, log=None)
    return out


def test_location_ids_are_those_written(split_shards):
    assert location_ids(split_shards / "train") == set(range(1, 29))
    assert location_ids(split_shards / "leaky_val") == set(range(1, 35))


def test_overlap_is_refused_with_counts(split_shards):
    s = split_shards
    with pytest.raises(SplitOverlapError) as err:
        check_split_overlap(DataPaths(str(s / "train"), str(s / "leaky_val"), str(s / "val"), ""))
    msg = str(err.value)
    assert "data.val_shards" in msg and "28 of its 34 locations" in msg and "28 train locations" in msg
    assert "data.allow_split_overlap=true" in msg and "\n" not in msg
    with pytest.raises(SplitOverlapError, match="data.test_shards"):
        check_split_overlap(DataPaths(str(s / "train"), str(s / "val"), str(s / "leaky_val"), ""))
    with pytest.raises(SplitOverlapError, match="28 of its 28 locations"):  # the train folder itself
        check_split_overlap(DataPaths(str(s / "train"), str(s / "train"), str(s / "val"), ""))
    check_split_overlap(DataPaths(str(s / "train"), str(s / "val"), str(s / "val"), ""))  # disjoint: fine
    check_split_overlap(DataPaths(str(s / "train"), str(s / "leaky_val"), str(s / "val"), ""), allow=True)


def test_trainer_refuses_overlap_unless_told(split_shards, tokenizer_dir, tmp_path):
    s = split_shards
    args = [f"data.train_shards={s / 'train'}", f"data.val_shards={s / 'leaky_val'}", "data.synthetic.locations=0",
            f"data.loader.tokenizer={tokenizer_dir}", f"train.output_dir={tmp_path / 'run'}"]
    with pytest.raises(SplitOverlapError, match="28 of its 34 locations"):
        Trainer(resolve_config(str(REPO / "configs" / "tiny_test.yaml"), args))
    cfg = resolve_config(str(REPO / "configs" / "tiny_test.yaml"), args + ["data.allow_split_overlap=true"])
    assert cfg.data.allow_split_overlap is True


def test_location_ids_without_manifest_keys_read_the_shards(split_shards, tmp_path):
    """Folders built before manifests listed their keys: the ids come from the samples."""
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(split_shards / "leaky_val", folder)
    m = json.loads((folder / "manifest.json").read_text())
    for e in m["shards"]:
        e.pop("keys")
    (folder / "manifest.json").write_text(json.dumps(m))
    assert location_ids(folder) == location_ids(split_shards / "leaky_val") == set(range(1, 35))


def test_overlap_and_unreadable_split_are_one_line_from_the_cli(split_shards, tokenizer_dir, tmp_path, capsys):
    """From `text4vpr train`: exit 2 and one line, not a traceback; an unreadable val folder too."""
    from text4vpr.cli import main

    s = split_shards
    (tmp_path / "no_manifest").mkdir()
    base = ["train", "--config", str(REPO / "configs" / "tiny_test.yaml"), f"data.train_shards={s / 'train'}",
            "data.synthetic.locations=0", f"data.loader.tokenizer={tokenizer_dir}"]
    for i, (val, says) in enumerate(((s / "leaky_val", "28 of its 34 locations"), (tmp_path / "no_manifest", "no manifest"))):
        rc = main(base + [f"data.val_shards={val}", f"train.output_dir={tmp_path / f'run{i}'}"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err[-2000:]
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], err
