"""Shards at a URL: nginx on loopback (tests/http_servers.py), a fault proxy in front of it;
batches equal the local folder's byte for byte, faults are retried, what cannot be read is
the local folder's error or counted skip, and the cache serves later epochs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from text4vpr.data.fetch_cache import ByteCache
from text4vpr.data.loader import LoaderConfig, LoaderError, build_loader
from text4vpr.data.remote import RemoteOptions, RemoteReadError, read_range
from text4vpr.utils.hashing import bytes_sha256

FAST = dict(remote_retries=4, remote_timeout_s=30.0, remote_stall_s=1.0)  # a stalled try is cut after 1 s


def _cfg(shards, tokenizer_dir, **kw):
    base = dict(shards=str(shards), tokenizer=str(tokenizer_dir), batch_size=2, image_size=32, num_workers=1,
                max_text_length=24, shuffle_buffer=3, **FAST)
    return LoaderConfig(**{**base, **kw})


def _batches(cfg, mode="train", epoch=0):
    return list(build_loader(cfg, mode, epoch=epoch, rank=0, world_size=1))


def _assert_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batches_from_nginx_equal_the_local_folders(synth_shards, tokenizer_dir, nginx, mode):
    url = nginx.serve(synth_shards, "plain")
    _assert_equal(_batches(_cfg(url, tokenizer_dir), mode), _batches(_cfg(synth_shards, tokenizer_dir), mode))


def test_each_request_failing_once_still_gives_the_local_batches(synth_shards, tokenizer_dir, nginx, fault_proxy,
                                                                 http_faults):
    nginx.serve(synth_shards, "faulty")
    proxy = fault_proxy(http_faults.FailEachOnce(), stall_s=4.0)
    got = _batches(_cfg(proxy.url("faulty"), tokenizer_dir, num_workers=0))
    _assert_equal(got, _batches(_cfg(synth_shards, tokenizer_dir, num_workers=0)))
    assert {kind for _, kind in proxy.faults} == set(http_faults.FAULTS)  # reset, 503, stall, truncate all met
    assert len(proxy.faults) == len(proxy.seen) == 4  # manifest + 3 shards, each failed once


def test_a_flipped_byte_on_the_server_is_the_local_folders_error_or_skip(synth_shards, tokenizer_dir, nginx, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(synth_shards, folder)
    shard = folder / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[data.index(b"\xff\xda") + 200] ^= 0x55  # inside the first JPEG's scan data
    shard.write_bytes(bytes(data))
    url = nginx.serve(folder, "flipped")
    with pytest.raises(LoaderError, match="flipped/shard-000002.tar.*sha256"):
        _batches(_cfg(url, tokenizer_dir, num_workers=0), "eval")
    loader = build_loader(_cfg(url, tokenizer_dir, num_workers=0, on_error="skip"), "eval")
    seen = [i for b in loader for i in b["index"].tolist()]
    assert len(seen) == 4 and loader.dataset.stats.samples_skipped == 2


def test_a_shard_failing_every_time_names_its_url_or_is_a_counted_skip(synth_shards, tokenizer_dir, nginx,
                                                                       fault_proxy, http_faults):
    nginx.serve(synth_shards, "broken")
    proxy = fault_proxy(http_faults.fail_always("shard-000001.tar", "reset"))
    cfg = _cfg(proxy.url("broken"), tokenizer_dir, num_workers=0, remote_retries=2)
    with pytest.raises(LoaderError, match=r"broken/shard-000001.tar: unreadable after 3 tries"):
        _batches(cfg, "eval")
    loader = build_loader(_cfg(proxy.url("broken"), tokenizer_dir, num_workers=0, remote_retries=2, on_error="skip"),
                          "eval")
    seen = sorted(i for b in loader for i in b["index"].tolist())
    local = sorted(i for b in _batches(_cfg(synth_shards, tokenizer_dir), "eval") for i in b["index"].tolist())
    assert len(seen) == 4 and set(seen) < set(local) and loader.dataset.stats.samples_skipped == 2


def test_a_cached_epoch_reads_no_shard_from_the_server_and_equals_local(synth_shards, tokenizer_dir, nginx,
                                                                        fault_proxy, tmp_path):
    nginx.serve(synth_shards, "cached")
    proxy = fault_proxy(lambda path, n: None)
    cfg = _cfg(proxy.url("cached"), tokenizer_dir, cache_dir=str(tmp_path / "cache"))
    _batches(cfg, epoch=0)
    tars = {p: n for p, n in proxy.seen.items() if p.endswith(".tar")}  # requests per shard (whole or by sample)
    assert len(tars) == 3
    _assert_equal(_batches(cfg, epoch=1), _batches(_cfg(synth_shards, tokenizer_dir), epoch=1))
    assert {p: n for p, n in proxy.seen.items() if p.endswith(".tar")} == tars  # epoch 1: all from the cache
    for entry in (tmp_path / "cache").glob("??/*"):  # damaged entries are dropped and fetched again
        entry.write_bytes(entry.read_bytes()[:-1] + b"!")
    _assert_equal(_batches(cfg, epoch=1), _batches(_cfg(synth_shards, tokenizer_dir), epoch=1))
    assert {p: n for p, n in proxy.seen.items() if p.endswith(".tar")} == {p: 2 * n for p, n in tars.items()}


def test_cache_evicts_least_recently_used_within_its_bound(tmp_path):
    cache = ByteCache(tmp_path, max_bytes=250)
    for key in "abc":
        cache.put(key, key.encode() * 100)
    assert cache.get("a") is None and cache.get("b") == b"b" * 100  # 300 > 250: oldest (a) went
    cache.put("d", b"d" * 100)  # b was read after c was written: c is now the least recent
    assert cache.get("c") is None and cache.get("b") == b"b" * 100 and cache.get("d") == b"d" * 100
    cache.put("big", b"x" * 251)  # over the bound on its own: not kept, nothing evicted for it
    assert cache.get("big") is None and cache.get("d") is not None


def _writer(root, rounds):
    cache = ByteCache(root, 1 << 30)
    for i in range(rounds):
        cache.put("k", bytes([i % 256]) * 200_000)


def test_concurrent_readers_never_see_a_half_written_entry(tmp_path):
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=_writer, args=(str(tmp_path), 200))  # writes only: fork is safe
    proc.start()
    cache, reads = ByteCache(tmp_path, 1 << 30), 0
    while proc.is_alive() or reads == 0:
        data = cache.get("k")
        if data is not None:
            assert len(data) == 200_000 and data == data[:1] * 200_000
            reads += 1
    proc.join()
    assert proc.exitcode == 0 and reads > 0
    assert not list(tmp_path.glob("??/.tmp-*"))


def test_read_range_survives_every_fault_kind_and_gives_up_within_its_budget(tmp_path, nginx, fault_proxy,
                                                                             http_faults):
    (tmp_path / "f").mkdir()
    blob = bytes(range(256)) * 1000
    (tmp_path / "f" / "blob.bin").write_bytes(blob)
    nginx.serve(tmp_path / "f", "ranges")
    proxy = fault_proxy(http_faults.FailEachOnce(), stall_s=4.0)
    opts = RemoteOptions(retries=2, timeout_s=30, stall_s=1.0, backoff_s=0.05)
    for i in range(4):
        assert read_range(proxy.url(f"ranges/blob.bin?{i}"), 1000 + i, 70_000, opts) == blob[1000 + i:71_000 + i]
    assert [kind for _, kind in proxy.faults] == list(http_faults.FAULTS)
    dead = fault_proxy(http_faults.fail_always("blob.bin", "503"))
    with pytest.raises(RemoteReadError, match=r"ranges/blob.bin: unreadable after 3 tries .*503"):
        read_range(dead.url("ranges/blob.bin"), 0, 10, opts)
    assert dead.seen["/ranges/blob.bin"] == 3
    with pytest.raises(RemoteReadError, match="not found on the server"):
        read_range(dead.url("ranges/missing.bin"), 0, 10, opts)


def test_a_stalled_server_ends_the_read_at_its_total_budget(tmp_path, nginx, fault_proxy, http_faults):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "blob.bin").write_bytes(b"x" * 50_000)
    nginx.serve(tmp_path / "f", "stalled")
    proxy = fault_proxy(http_faults.fail_always("blob.bin", "stall"), stall_s=60.0)
    opts = RemoteOptions(retries=3, timeout_s=2.0, stall_s=30.0, backoff_s=0.05)  # the budget ends the first try
    with pytest.raises(RemoteReadError, match=r"stalled/blob.bin: unreadable after 1 tries in 2 s \(last: FSTimeoutError"):
        read_range(proxy.url("stalled/blob.bin"), 0, 50_000, opts)


@pytest.mark.parametrize("key, value", [("remote_retries", -1), ("remote_in_flight", 0), ("remote_timeout_s", 0.0),
                                        ("remote_stall_s", -1.0), ("cache_gb", 0.0)])
def test_remote_settings_out_of_range_name_their_key(key, value):
    from text4vpr.config import ConfigError

    with pytest.raises(ConfigError, match=f"data.loader.{key}: "):
        LoaderConfig(**{key: value})


def test_ranges_started_together_equal_the_bytes_and_fail_one_by_one(tmp_path, nginx, fault_proxy, http_faults):
    """`Fetcher.start`: a batch's reads at once (3 requests in flight), the ranges of one file in
    one multi-range request, every request failing once first (a multipart body cut short too);
    each result is its bytes or its own error, in order, and a second start reads the cache."""
    from text4vpr.data.fetch import DigestMismatch, Fetcher

    rng = np.random.default_rng(0)
    blob = rng.bytes(300_000)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "blob.bin").write_bytes(blob)
    nginx.serve(tmp_path / "f", "many")
    kinds = http_faults.FAULTS  # each file's first request fails, the kind chosen by its last digit (or a reset)
    proxy = fault_proxy(lambda path, n: None if n else kinds[int(path[-1]) % 4] if path[-1].isdigit() else "reset",
                        stall_s=4.0)
    names = [f"many/blob.bin?{k}" for k in range(6)] + [f"many/blob.bin?group{k % 4}" for k in range(12)]
    spans = [(int(o), int(n)) for o, n in zip(rng.integers(0, 200_000, 18), rng.integers(1, 90_000, 18))]
    reqs = [(proxy.url(p), o, n, bytes_sha256(blob[o:o + n])) for p, (o, n) in zip(names, spans)]
    reqs += [(proxy.url("many/missing.bin"), 0, 10, None), (proxy.url("many/blob.bin?bad"), 5, 100, "0" * 64)]
    opts = RemoteOptions(retries=2, timeout_s=30, stall_s=1.0, backoff_s=0.05)
    fetcher = Fetcher(opts, ByteCache(tmp_path / "cache", 1 << 30), in_flight=3)
    got = fetcher.start(reqs).results()
    assert got[:18] == [blob[o:o + n] for o, n in spans]
    assert isinstance(got[18], RemoteReadError) and "missing.bin: not found" in str(got[18])
    assert isinstance(got[19], DigestMismatch) and "blob.bin?bad" in str(got[19])
    assert len(proxy.faults) == len(proxy.seen) == 12  # 6 + 4 groups + 2
    assert all(proxy.seen[p] == 2 for p in proxy.seen if "missing" not in p)  # one request per file: failed, then read
    assert {(p, kind) for p, kind in proxy.faults if "group" in p} == {(f"/many/blob.bin?group{k}", kinds[k]) for k in range(4)}
    seen = dict(proxy.seen)
    assert fetcher.start(reqs[:18]).results() == got[:18] and proxy.seen == seen  # all from the cache


def test_a_server_answering_a_list_of_ranges_with_the_whole_file_is_read_range_by_range(tmp_path, nginx, fault_proxy):
    from text4vpr.data.fetch import Fetcher

    blob = np.random.default_rng(1).bytes(200_000)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "blob.bin").write_bytes(blob)
    nginx.serve(tmp_path / "f", "single-range/f")  # nginx max_ranges 1, as S3 does
    proxy = fault_proxy(lambda path, n: None)
    spans = [(0, 1000), (150_000, 40_000), (7, 7), (60_000, 512)]
    reqs = [(proxy.url("single-range/f/blob.bin"), o, n, bytes_sha256(blob[o:o + n])) for o, n in spans]
    fetcher = Fetcher(RemoteOptions(retries=0, timeout_s=30, stall_s=5.0), None, in_flight=2)
    assert fetcher.start(reqs).results() == [blob[o:o + n] for o, n in spans]
    assert proxy.seen == {"/single-range/f/blob.bin": 1 + len(spans)}  # the list refused once, then one by one
    assert fetcher.start(reqs).results() == [blob[o:o + n] for o, n in spans]
    assert proxy.seen == {"/single-range/f/blob.bin": 1 + 2 * len(spans)}  # that server is not asked for lists again


def test_multipart_parts_are_cut_by_their_lengths_not_by_the_boundary():
    from text4vpr.data.http_ranges import CutShort, split_parts

    rng = np.random.default_rng(2)
    boundary = b"00000000000000000007"
    datas = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 5)]
    datas[2] = datas[2][:100] + b"\r\n--" + boundary + b"\r\n" + datas[2][100:]  # the boundary inside the data
    first, body = 0, b""
    for d in datas:
        body += (b"\r\n--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
                 + f"Content-Range: bytes {first}-{first + len(d) - 1}/999999\r\n\r\n".encode() + d)
        first += len(d) + 10
    body += b"\r\n--" + boundary + b"--\r\n"
    parts = split_parts(body, boundary)
    assert [p[2] for p in parts] == datas and [p[1] - p[0] + 1 for p in parts] == [len(d) for d in datas]
    with pytest.raises(CutShort):
        split_parts(body[:len(body) // 2], boundary)


def test_many_ranges_of_one_file_go_in_requests_of_at_most_max_ranges(tmp_path, nginx, fault_proxy):
    from text4vpr.data.remote_batch import MAX_RANGES, start_ranges

    blob = np.random.default_rng(3).bytes(200_000)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "blob.bin").write_bytes(blob)
    nginx.serve(tmp_path / "f", "chunks")
    proxy = fault_proxy(lambda path, n: None)
    spans = [(i * 600, 333) for i in range(2 * MAX_RANGES + 5)]
    got = start_ranges([(proxy.url("chunks/blob.bin"), o, n) for o, n in spans], RemoteOptions(), 2).result()
    assert got == [blob[o:o + n] for o, n in spans] and proxy.seen == {"/chunks/blob.bin": 3}


def test_a_server_ignoring_range_is_refused_at_the_first_answer(tmp_path):
    """Found from outside: the "no Range support" refusal was retried until the tries ran out,
    ending with "raise data.loader.remote_retries", advice that cannot help. Python's own
    http.server ignores Range (it answers 200 with the whole file): a real such server."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    seen = []

    class Counting(SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Range"))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blob.bin"
        with pytest.raises(RemoteReadError, match="no Range support") as caught:
            read_range(url, 100, 50, RemoteOptions(retries=4, timeout_s=30.0, backoff_s=0.01))
        assert "tries" not in str(caught.value)
        assert len([r for r in seen if r]) == 1  # one ranged request: no retry
    finally:
        server.shutdown()
        server.server_close()
