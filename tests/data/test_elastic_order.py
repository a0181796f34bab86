"""Elastic train order: the same global batches for any world size and worker count, exact resume
at a global batch, per-sample byte ranges that read what the sequential tar reader reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from text4vpr.data.loader import LoaderConfig, LoaderError, batches_per_epoch, build_loader
from text4vpr.data.order import epoch_order, per_rank_batch
from text4vpr.data.sample_index import index_offsets, parse_sample
from text4vpr.data.shard_reader import iter_tar_samples, sample_ranges

G = 4  # global batch in locations: 1 x 4, 2 x 2, 4 x 1


@pytest.fixture
def shards(train_shards):
    """28 train locations in 6 shards (the last short): more shards than the window of 3."""
    return train_shards


def _cfg(shards, tokenizer_dir, world, **kw):
    base = dict(shards=str(shards), tokenizer=str(tokenizer_dir), batch_size=G // world, image_size=16,
                num_workers=0, max_text_length=16, shuffle_window=3)
    return LoaderConfig(**{**base, **kw})


def global_batches(shards, tokenizer_dir, world: int, workers: int, epoch: int, start: int = 0) -> list[list[int]]:
    """Location ids of every global batch, each rank's share in rank order (in one process)."""
    ranks = [[b["index"].tolist() for b in build_loader(_cfg(shards, tokenizer_dir, world, num_workers=workers), "train",
                                                      epoch=epoch, rank=r, world_size=world, start_batch=start)]
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # every rank yields as many batches: DDP never hangs
    return [sum(parts, []) for parts in zip(*ranks)]


def test_epoch_order_is_a_permutation_that_stays_within_windows():
    counts = [3, 5, 0, 4, 2, 6, 1]
    shard, sample = epoch_order(counts, seed=3, epoch=1, window=2)
    assert sorted(zip(shard.tolist(), sample.tolist())) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    perm = np.random.default_rng([3, 1, 7]).permutation(len(counts))
    pos = 0
    for w0 in range(0, len(counts), 2):  # each window's samples come together, from that window's shards only
        group = perm[w0:w0 + 2]
        n = sum(counts[g] for g in group)
        assert set(shard[pos:pos + n].tolist()) <= set(group.tolist())
        pos += n
    again = epoch_order(counts, seed=3, epoch=1, window=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, (shard, sample)))
    assert not np.array_equal(epoch_order(counts, seed=3, epoch=2, window=2)[0], shard)


def test_global_batches_are_the_same_for_any_world_and_workers(shards, tokenizer_dir):
    for epoch in (0, 1):
        ref = global_batches(shards, tokenizer_dir, 1, 0, epoch)
        assert len(ref) == 28 // G and all(len(b) == G for b in ref)
        assert len({i for b in ref for i in b}) == len(ref) * G  # each location at most once per epoch
        for world in (1, 2, 4):
            for workers in (0, 1, 3):
                got = global_batches(shards, tokenizer_dir, world, workers, epoch)
                assert got == ref, (epoch, world, workers)  # same locations, same order within the batch
    assert global_batches(shards, tokenizer_dir, 1, 0, 0) != global_batches(shards, tokenizer_dir, 1, 0, 1)


def test_resume_on_another_world_continues_at_the_next_global_batch(shards, tokenizer_dir):
    full = global_batches(shards, tokenizer_dir, 2, 1, epoch=1)
    for world, workers in ((1, 0), (4, 3), (2, 2)):
        assert global_batches(shards, tokenizer_dir, world, workers, epoch=1, start=4) == full[4:]


def test_a_world_that_does_not_divide_the_global_batch_is_refused_naming_valid_counts():
    assert per_rank_batch(12, 3) == 4
    with pytest.raises(LoaderError, match=r"global batch of 12 .* 5 ranks; run on 1, 2, 3, 4, 6, 12 ranks"):
        per_rank_batch(12, 5)


def test_sample_ranges_read_what_the_tar_reader_reads(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["shards"]:
        data = (shards / entry["name"]).read_bytes()
        sequential = list(iter_tar_samples(shards / entry["name"]))
        assert [k for k, _ in sequential] == entry["keys"]
        for (key, members), (offset, size, _) in zip(sequential, entry["samples"]):
            assert parse_sample(data[offset:offset + size], key) == members
        assert [list(r[1:]) for r in sample_ranges(shards / entry["name"])] == entry["samples"]


def test_a_folder_without_offsets_says_so_and_index_offsets_adds_them(shards, tokenizer_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for e in manifest["shards"]:
        del e["samples"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    tars = {p.name: p.read_bytes() for p in old.glob("*.tar")}
    with pytest.raises(LoaderError, match=f"{old}: its manifest has no per-sample byte offsets.*text4vpr shards index-offsets {old}"):
        build_loader(_cfg(old, tokenizer_dir, 1), "train")
    done = subprocess.run([sys.executable, "-m", "text4vpr", "shards", "index-offsets", str(old)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "byte offsets of 28 samples in 6 shards" in done.stdout, done.stderr
    assert {p.name: p.read_bytes() for p in old.glob("*.tar")} == tars  # the tars are not rewritten
    assert json.loads((old / "manifest.json").read_text()) == json.loads((shards / "manifest.json").read_text())
    assert global_batches(old, tokenizer_dir, 2, 0, 0) == global_batches(shards, tokenizer_dir, 2, 0, 0)


def test_index_offsets_refuses_a_shard_that_is_not_the_manifests(shards, tmp_path):
    from text4vpr.data.shard_reader import ShardError

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    (bad / "shard-000002.tar").write_bytes((shards / "shard-000001.tar").read_bytes())
    with pytest.raises(ShardError, match="shard-000002.tar: missing, or not the shard"):
        index_offsets(bad)


def test_a_changed_sample_is_refused_by_its_digest_and_skipped_alone(shards, tokenizer_dir, tmp_path):
    """verify=True checks each sample a rank reads against its manifest sha256; under skip only
    that location leaves its global batch, on whatever world size."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = manifest["shards"][2]
    offset, size, _ = entry["samples"][1]
    path = bad / entry["name"]
    data = bytearray(path.read_bytes())
    data[offset + size - 600] ^= 0xFF  # a byte inside the sample's last JPEG
    path.write_bytes(bytes(data))
    key = entry["keys"][1]
    with pytest.raises(LoaderError, match=f"{entry['name']}: sample {key}: .*sha256"):
        global_batches(bad, tokenizer_dir, 1, 0, 0)
    lost = int(key.rsplit("-", 1)[1])
    ref = global_batches(shards, tokenizer_dir, 1, 0, 0)
    for world in (1, 2, 4):
        got = [list(build_loader(_cfg(bad, tokenizer_dir, world, on_error="skip"), "train", rank=r, world_size=world))
               for r in range(world)]
        assert [sum((b["index"].tolist() for b in p), []) for p in zip(*got)] == [[i for i in b if i != lost] for b in ref]
        # each batch counts its rank's skipped samples (the trainer sums them over ranks)
        assert [sum(int(b["skipped"]) for b in p) for p in zip(*got)] == [int(lost in b) for b in ref]


@pytest.mark.slow
def test_torchrun_gloo_ranks_make_the_same_global_batches(shards, tokenizer_dir, tmp_path):
    """Real gloo worlds of 2 and 4 processes (rank and world from torch.distributed), workers
    0, 1 and 3: epochs 0 and 1 hold the one-process global batches."""
    from tests.helpers import HANG_GUARD_S, free_port

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    want = {e: global_batches(shards, tokenizer_dir, 1, 0, e) for e in (0, 1)}
    for world in (2, 4):
        out = tmp_path / f"w{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), os.path.join(repo, "tests", "data", "dist_order_worker.py"), str(shards),
               str(tokenizer_dir), str(G), str(out)]
        subprocess.run(cmd, check=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"},
                       timeout=HANG_GUARD_S)
        got = json.loads(out.read_text())
        for workers in ("0", "1", "3"):
            for e in (0, 1):
                assert got[workers][str(e)] == want[e], (world, workers, e)
    assert batches_per_epoch(_cfg(shards, tokenizer_dir, 1)) == 28 // G


def test_inspect_and_the_loader_check_the_byte_ranges_of_the_manifest(shards, tokenizer_dir, tmp_path):
    from text4vpr.data.shard_reader import verify_shards

    assert verify_shards(shards)["ok"]
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][1]["samples"][2][1] += 512  # one sample's range a block too long
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(bad)["problems"] == ["shard-000001.tar: per-sample byte offsets differ from the manifest's"]
    manifest["shards"][1]["samples"][2][0] = manifest["shards"][1]["bytes"]  # past the end of the shard
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match="manifest entry shard-000001.tar: sample record .* reaches past the shard"):
        build_loader(_cfg(bad, tokenizer_dir, 1), "train")


def test_a_rank_whose_whole_share_is_unreadable_still_yields_its_batch(shards, tokenizer_dir, tmp_path):
    """Under skip every rank yields every batch (DDP never waits), an empty one if need be."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    for tar in bad.glob("*.tar"):
        tar.write_bytes(b"\0" * tar.stat().st_size)  # every sample unreadable
    loader = build_loader(_cfg(bad, tokenizer_dir, 4, on_error="skip"), "train", rank=1, world_size=4)
    batches = list(loader)
    assert len(batches) == len(loader) == 28 // G
    assert all(b["index"].shape == (0,) and b["view_mask"].shape == (0, 4) for b in batches)
    assert loader.dataset.stats.samples_skipped == 28 // G
