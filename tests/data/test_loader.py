"""Loader: batch format, exact eval split over ranks x workers, equal train steps, resume,
corrupt JPEG and truncated tar under both error policies."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from text4vpr.data.loader import LoaderConfig, LoaderError, batches_per_epoch, build_loader
from text4vpr.data.partition import worker_batch_range
from text4vpr.data.shard_reader import shard_descriptions
from text4vpr.data.shards import BuildOptions, build_shards
from text4vpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images


def _cfg(shards, tokenizer_dir, **kw):
    base = dict(shards=str(shards), tokenizer=str(tokenizer_dir), batch_size=3, image_size=32, num_workers=0,
                max_text_length=24, shuffle_buffer=6)
    return LoaderConfig(**{**base, **kw})


def _indices(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def test_batch_dict_format_and_normalisation(synth_shards, synth_root, tokenizer_dir):
    cfg = _cfg(synth_shards, tokenizer_dir, batch_size=4)
    batches = list(build_loader(cfg, "eval"))
    b = batches[0]
    assert b["images"].shape == (4, 4, 3, 32, 32) and b["images"].dtype == torch.float32
    assert b["input_ids"].shape == (4, 4, 24) and b["input_ids"].dtype == torch.int64
    assert b["attention_mask"].shape == (4, 4, 24) and b["attention_mask"].dtype == torch.int64
    assert b["view_mask"].dtype == torch.bool and b["view_mask"].all()
    assert b["coords"].shape == (4, 3) and b["coords"].dtype == torch.float64
    assert b["index"].dtype == torch.int64 and [len(x["index"]) for x in batches] == [4, 2]
    # the first image equals a hand-made resize + ImageNet normalisation of the source JPEG
    idx = int(b["index"][0])
    with Image.open(synth_root / "Street360Loc_images" / f"{idx:06d}_1.jpg") as im:
        ref = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(b["images"][0, 0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert (b["attention_mask"].sum(-1) > 5).all() and (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    assert len(shard_descriptions(synth_shards)) == 24


def test_missing_views_are_zero_images_and_pad_text(synth_root, tmp_path, tokenizer_dir):
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    (root / "Street360Loc_images" / "000035_3.jpg").unlink()
    build_shards(root / "test_description.xlsx", root / "Street360Loc_images", tmp_path / "s", progress=False, log=None)
    (b,) = list(build_loader(_cfg(tmp_path / "s", tokenizer_dir, batch_size=6), "eval"))
    row = b["index"].tolist().index(35)
    assert b["view_mask"][row].tolist() == [True, True, False, True]
    assert (b["images"][row, 2] == 0).all() and (b["input_ids"][row, 2] == 0).all()
    assert (b["attention_mask"][row, 2] == 0).all() and b["attention_mask"][row, 1].sum() > 0


def test_uint8_batches_normalised_on_the_device_equal_float32_batches(synth_root, tmp_path, tokenizer_dir):
    """Fresh shards with a missing view, 2 workers: uint8 path + normalize_images == float32 path, bit for bit."""
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    (root / "Street360Loc_images" / "000036_2.jpg").unlink()
    build_shards(root / "test_description.xlsx", root / "Street360Loc_images", tmp_path / "s",
                 BuildOptions(max_count=2), progress=False, log=None)
    f32 = list(build_loader(_cfg(tmp_path / "s", tokenizer_dir, num_workers=2, image_size=40), "eval"))
    u8 = list(build_loader(_cfg(tmp_path / "s", tokenizer_dir, num_workers=2, image_size=40, image_dtype="uint8"), "eval"))
    assert len(f32) == len(u8) > 1 and not all(b["view_mask"].all() for b in u8)
    for a, b in zip(f32, u8):
        assert b["images"].dtype == torch.uint8 and b["images"].shape == a["images"].shape
        assert (b["images"][~b["view_mask"]] == 0).all()  # missing view: black pixels before normalising
        assert torch.equal(normalize_images(b["images"], b["view_mask"]), a["images"])
        assert torch.equal(normalize_images(b["images"].float(), b["view_mask"]), a["images"])  # float on 0-255 scale
        assert all(torch.equal(a[k], b[k]) for k in a if k != "images")


def test_fast_decode_is_close_and_exact_at_target_size(synth_shards, synth_root, tmp_path, tokenizer_dir):
    exact = list(build_loader(_cfg(synth_shards, tokenizer_dir, image_size=24, image_dtype="uint8"), "eval"))
    fast = list(build_loader(_cfg(synth_shards, tokenizer_dir, image_size=24, image_dtype="uint8", fast_decode=True), "eval"))
    for a, b in zip(exact, fast):  # 64 px JPEGs decoded at 32 px (draft 1/2), then resized to 24
        diff = (a["images"].float() - b["images"].float()).abs()
        assert b["images"].shape == a["images"].shape and diff.mean() < 6 and not torch.equal(a["images"], b["images"])
    # shards already at the target size: no draft, no resize, both equal the decoded JPEG
    build_shards(synth_root / "test_description.xlsx", synth_root / "Street360Loc_images", tmp_path / "r",
                 BuildOptions(resize=32), progress=False, log=None)
    exact = list(build_loader(_cfg(tmp_path / "r", tokenizer_dir, image_size=32, image_dtype="uint8"), "eval"))
    fast = list(build_loader(_cfg(tmp_path / "r", tokenizer_dir, image_size=32, image_dtype="uint8", fast_decode=True), "eval"))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(exact, fast))
    with tarfile.open(tmp_path / "r" / "shard-000000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".1.jpg"))
        key = int(member.name.split(".")[0].split("-")[-1])
        with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W)
    b = next(b for b in exact if key in b["index"].tolist())
    assert torch.equal(b["images"][b["index"].tolist().index(key), 0], ref)


def test_image_dtype_is_checked(synth_shards, tokenizer_dir):
    with pytest.raises(ValueError, match="image_dtype"):
        build_loader(_cfg(synth_shards, tokenizer_dir, image_dtype="float16"), "eval")


@pytest.mark.parametrize("batch_size", [3, 4])
def test_eval_two_ranks_two_workers_cover_every_location_once(train_shards, tokenizer_dir, batch_size):
    cfg = _cfg(train_shards, tokenizer_dir, num_workers=2, batch_size=batch_size)
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "eval", rank=rank, world_size=2)
        got = _indices(loader)
        assert len(got) == len(loader)  # exact eval length from the manifest
        seen += [i for b in got for i in b]
    assert sorted(seen) == list(range(1, 29))


def test_eval_with_fewer_shards_than_slots_splits_by_sample(synth_shards, tokenizer_dir):
    cfg = _cfg(synth_shards, tokenizer_dir, num_workers=2, batch_size=2)  # 3 shards, 4 slots
    seen = [i for rank in range(2) for b in _indices(build_loader(cfg, "eval", rank=rank, world_size=2)) for i in b]
    assert sorted(seen) == list(range(35, 41))


def test_train_equal_steps_on_every_rank_with_uneven_shards(train_shards, tokenizer_dir):
    cfg = _cfg(train_shards, tokenizer_dir, num_workers=2)
    steps = batches_per_epoch(cfg, world_size=3)
    assert steps == 28 // (3 * 3)
    for rank in range(3):
        loader = build_loader(cfg, "train", epoch=0, rank=rank, world_size=3)
        batches = _indices(loader)
        assert len(batches) == len(loader) == steps and all(len(b) == 3 for b in batches)


def test_train_shuffle_changes_per_epoch_and_repeats_per_seed(train_shards, tokenizer_dir):
    cfg = _cfg(train_shards, tokenizer_dir)
    e0 = _indices(build_loader(cfg, "train", epoch=0))
    assert e0 == _indices(build_loader(cfg, "train", epoch=0))
    assert e0 != _indices(build_loader(cfg, "train", epoch=1))
    r0 = _indices(build_loader(cfg, "train", epoch=0, rank=0, world_size=2))
    r1 = _indices(build_loader(cfg, "train", epoch=0, rank=1, world_size=2))
    assert not set(sum(r0, [])) & set(sum(r1, []))  # 6 shards, 2 slots: ranks read different shards
    seeded = _indices(build_loader(_cfg(train_shards, tokenizer_dir, seed=1), "train", epoch=0))
    assert seeded != e0


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_shard_assignment_keeps_each_rank_on_its_shards(train_shards, tokenizer_dir, workers):
    def per_epoch(cfg, rank):
        return [_indices(build_loader(cfg, "train", epoch=e, rank=rank, world_size=2)) for e in range(3)]

    def union(epochs):
        return {i for batches in epochs for b in batches for i in b}

    fixed = _cfg(train_shards, tokenizer_dir, num_workers=workers, fixed_shard_assignment=True)
    r0, r1 = per_epoch(fixed, 0), per_epoch(fixed, 1)
    assert not union(r0) & union(r1)  # over all epochs, each location stays on one rank
    assert r0[0] != r0[1] and r1[0] != r1[1]  # still a new order every epoch
    assert all(len(e) == batches_per_epoch(fixed, world_size=2) for e in r0 + r1)
    resumed = _indices(build_loader(fixed, "train", epoch=1, rank=1, world_size=2, start_batch=2))
    assert resumed == r1[1][2:]
    default = _cfg(train_shards, tokenizer_dir, num_workers=workers)
    assert union(per_epoch(default, 0)) & union(per_epoch(default, 1))  # by default ranks trade shards


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_images_leaves_cached_locations_undecoded_and_the_rest_unchanged(train_shards, tokenizer_dir, workers):
    """What a trainer with a frozen-trunk cache asks for: zero images for the given locations
    (no JPEG decode), everything else of the batch bitwise as without the option."""
    cfg = _cfg(train_shards, tokenizer_dir, num_workers=workers, image_dtype="uint8")
    full = list(build_loader(cfg, "train", epoch=1))
    skip = frozenset(i for b in full[::2] for i in b["index"].tolist()[:2])  # some locations of some batches
    part = list(build_loader(cfg, "train", epoch=1, skip_images=skip))
    assert len(part) == len(full) and len(skip) >= 4
    for a, b in zip(full, part):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if k != "images")
        skipped = torch.tensor([i in skip for i in a["index"].tolist()])
        assert (b["images"][skipped] == 0).all()
        assert torch.equal(b["images"][~skipped], a["images"][~skipped])
        assert a["images"][skipped].float().abs().sum() > 0 or not skipped.any()  # they had real pixels


def test_more_batches_per_epoch_than_the_elastic_order_holds_is_refused(train_shards, tokenizer_dir):
    """Found from outside: 28 locations, G 8, batches_per_epoch 5 gave batches [8, 8, 8, 4, 0]
    (short, then empty: a ZeroDivisionError in the loss, ranks diverging)."""
    cfg = _cfg(train_shards, tokenizer_dir, batch_size=8, batches_per_epoch=5)
    with pytest.raises(LoaderError, match=r"batches_per_epoch=5.*28 locations hold 3 full global batches of 8"):
        batches_per_epoch(cfg, world_size=1)
    with pytest.raises(LoaderError, match=r"batches_per_epoch=5"):
        build_loader(cfg, mode="train", rank=0, world_size=1)
    fewer = _cfg(train_shards, tokenizer_dir, batch_size=4, batches_per_epoch=2)
    assert [len(b) for b in _indices(build_loader(fewer, mode="train", rank=1, world_size=2))] == [4, 4]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_start_batch_resumes_exactly(train_shards, tokenizer_dir, workers):
    cfg = _cfg(train_shards, tokenizer_dir, num_workers=workers)
    full = list(build_loader(cfg, "train", epoch=2))
    for start in (1, 4, len(full)):
        rest = list(build_loader(cfg, "train", epoch=2, start_batch=start))
        assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[start:]]
    a, b = full[5], list(build_loader(cfg, "train", epoch=2, start_batch=5))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_worker_batch_range_partitions_the_epoch():
    for total in (0, 1, 7, 10):
        for w in (1, 2, 3, 4):
            for start in range(total + 1):
                got = []
                ranges = [worker_batch_range(total, start, w, p) for p in range(w)]
                # the DataLoader round robin over physical workers, skipping exhausted ones
                local = [list(range(first, end)) for _, first, end in ranges]
                while any(local):
                    for p in range(w):
                        if local[p]:
                            got.append(local[p].pop(0) * w + ranges[p][0])
                assert got == list(range(start, total)), (total, w, start)


def _corrupt_member(shards, tmp_path, truncate: bool):
    """Copy a shard folder; break one JPEG member of shard 1 (or cut shard 1 in half). Read it
    with verify=False: the checksum would refuse the shard before these decode/tar checks run."""
    out = tmp_path / "broken"
    shutil.copytree(shards, out)
    path = out / "shard-000001.tar"
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return out
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".2.jpg") and "000007" in info.name:
                data = data[:40] + b"\x00garbage" * 10
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_corrupt_jpeg_raises_naming_shard_and_key(train_shards, tokenizer_dir, tmp_path, mode):
    broken = _corrupt_member(train_shards, tmp_path, truncate=False)
    with pytest.raises(LoaderError, match=r"shard-000001\.tar: sample train-000007"):
        list(build_loader(_cfg(broken, tokenizer_dir, shuffle_buffer=1, verify=False), mode))


def test_corrupt_jpeg_skip_counts_and_logs(train_shards, tokenizer_dir, tmp_path, caplog):
    broken = _corrupt_member(train_shards, tmp_path, truncate=False)
    loader = build_loader(_cfg(broken, tokenizer_dir, on_error="skip", verify=False), "eval")
    with caplog.at_level(logging.WARNING, logger="text4vpr.data.loader"):
        seen = sorted(i for b in _indices(loader) for i in b)
    assert seen == [i for i in range(1, 29) if i != 7]
    assert loader.dataset.stats.samples_skipped == 1
    assert any("train-000007" in r.getMessage() for r in caplog.records)


def test_truncated_tar_raise_and_skip(train_shards, tokenizer_dir, tmp_path, caplog):
    broken = _corrupt_member(train_shards, tmp_path, truncate=True)
    with pytest.raises(LoaderError, match=r"shard-000001\.tar: (corrupt or truncated|\d+ samples, manifest says 5)"):
        list(build_loader(_cfg(broken, tokenizer_dir, verify=False), "eval"))
    loader = build_loader(_cfg(broken, tokenizer_dir, on_error="skip", verify=False), "eval")
    with caplog.at_level(logging.WARNING, logger="text4vpr.data.loader"):
        seen = sorted(i for b in _indices(loader) for i in b)
    lost = 28 - len(seen)
    assert 1 <= lost <= 5 and set(seen) >= set(range(1, 6)) | set(range(11, 29))
    assert loader.dataset.stats.samples_skipped == lost and loader.dataset.stats.shards_truncated == 1
    assert any("shard-000001.tar" in r.getMessage() for r in caplog.records)
    # more slots than shards: every slot reads the short shard, its loss is counted once
    ranks = [build_loader(_cfg(broken, tokenizer_dir, on_error="skip", verify=False), "eval", rank=r, world_size=8) for r in range(8)]
    seen8 = sorted(i for loader8 in ranks for b in _indices(loader8) for i in b)
    assert seen8 == seen
    assert sum(r.dataset.stats.samples_skipped for r in ranks) == lost
    assert sum(r.dataset.stats.shards_truncated for r in ranks) == 1
    # train mode keeps its exact step count even when a shard is short
    train = build_loader(_cfg(broken, tokenizer_dir, on_error="skip", verify=False), "train")
    assert len(_indices(train)) == len(train) == 9


def test_manifest_json_is_what_the_loader_counts(train_shards):
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 5, 3]


@pytest.mark.slow
def test_torchrun_two_processes_split_eval_exactly_and_train_evenly(train_shards, tokenizer_dir, tmp_path):
    """A real 2-process gloo run: ranks come from torch.distributed, not from arguments."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.helpers import HANG_GUARD_S, free_port

    port = str(free_port())  # parallel test runs do not collide
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(repo, "tests", "data", "dist_loader_worker.py"), str(train_shards), str(tokenizer_dir), str(out)]
    subprocess.run(cmd, check=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, timeout=HANG_GUARD_S)
    ranks = json.loads(out.read_text())
    assert sorted(i for r in ranks for i in r["eval"]) == list(range(1, 29))
    assert [r["train_steps"] for r in ranks] == [r["expected"] for r in ranks] == [28 // 6] * 2


def test_long_descriptions_are_cut_and_counted(synth_shards, tokenizer_dir):
    from text4vpr.data.stream import ShardStream

    cfg = LoaderConfig(shards=str(synth_shards), tokenizer=str(tokenizer_dir), batch_size=2, image_size=28,
                       num_workers=0, max_text_length=8)
    stream = ShardStream(cfg, "eval", 0, 0, 1)
    batches = list(stream)
    assert all(b["input_ids"].shape[-1] == 8 for b in batches)
    views = sum(int(b["view_mask"].sum()) for b in batches)
    assert stream.stats.texts_truncated == views  # every synthetic description is longer than 8 tokens


_LEAK_A_WORKER_ITERATOR = """
import gc, sys
from text4vpr.data.loader import LoaderConfig, build_loader
cfg = LoaderConfig(shards=sys.argv[1], tokenizer=sys.argv[2], batch_size=3, image_size=32, num_workers=2,
                   max_text_length=24, shuffle_buffer=6)
it = iter(build_loader(cfg, mode="train", rank=0, world_size=1))
next(it)
gc.disable()  # a cycle keeps the iterator, and its workers, alive until the interpreter exits
cycle = [it]
cycle.append(cycle)
"""


@pytest.mark.slow
def test_a_process_leaving_a_worker_iterator_alive_still_exits(train_shards, tokenizer_dir):
    """Workers ignore SIGTERM (the trainer decides when to stop), so Python's exit-time terminate
    of leaked workers used to be ignored and the exit hung in waitpid forever (CI timed out)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import HANG_GUARD_S

    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", _LEAK_A_WORKER_ITERATOR, str(train_shards), str(tokenizer_dir)],
                          capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                          timeout=HANG_GUARD_S / 12)  # a hang guard, not a measurement
    assert done.returncode == 0, done.stderr[-2000:]
