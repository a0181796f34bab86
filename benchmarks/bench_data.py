#!/usr/bin/env python
"""Data-path benchmark on synthetic 640x640 Street360Loc.

Measures in one run: (a) shard build rate with and without --resize 252, (b) loader
images/s per worker from shards (one in-process worker, and the whole DataLoader with
--workers processes) for float32 batches (normalised in the loader), uint8 batches (the
trainer normalises them on the device), uint8 batches of locations held by the frozen-trunk
cache (no JPEG decode, as in cached epochs) and uint8 + fast_decode on 640 px shards, and the
cost of shard verification (uint8 252 px with verify=True against verify=False), (c) a
faithful re-implementation of the upstream loading path (pandas DataFrame re-grouped per
item, PIL open from the folder, resize 252, normalise to float) on the same data, one
process. The loading configurations run interleaved, one pass each per round, so a change
in machine load hits them all alike. Prints a table with ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from text4vpr.data.loader import LoaderConfig, build_loader  # noqa: E402
from text4vpr.data.shard_reader import shard_descriptions  # noqa: E402
from text4vpr.data.shards import BuildOptions, build_shards  # noqa: E402
from text4vpr.data.synthetic import SynthConfig, write_synthetic  # noqa: E402
from text4vpr.data.tokenizer import train_tokenizer  # noqa: E402
from text4vpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402


class UpstreamStyleDataset(torch.utils.data.Dataset):
    """The upstream path: DataFrame re-grouped on every item, JPEGs opened one by one."""

    def __init__(self, xlsx: Path, image_dir: Path, size: int = 252):
        import pandas as pd

        self.df = pd.read_excel(xlsx)
        self.keys = list(self.df.groupby("index").groups.keys())
        self.image_dir, self.size = image_dir, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        from PIL import Image

        group = self.df.groupby("index").get_group(self.keys[i]).sort_values("pos")  # re-grouped per item
        images, texts = [], []
        for _, row in group.iterrows():
            img = Image.open(self.image_dir / f"{int(row['index']):06d}_{int(row['pos'])}.jpg").convert("RGB")
            img = img.resize((self.size, self.size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            images.append((t - self.mean) / self.std)
            texts.append(str(row["text_description"]))
        coords = torch.tensor(group[["x", "y", "z"]].values[0], dtype=torch.float64)
        return torch.stack(images), texts, coords  # (4, 3, H, W)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_build(data: Path, out: Path, resize: int | None, workers: int) -> dict:
    manifest, secs = _timed(lambda: build_shards(
        data / "train_description.xlsx", data / "Street360Loc_images", out,
        BuildOptions(resize=resize, workers=workers, max_count=16), progress=False, log=None))
    n, mb = manifest["totals"]["locations"], manifest["totals"]["bytes"] / 1e6
    return {"resize": resize, "workers": workers, "seconds": secs, "locations_per_s": n / secs, "mb_per_s": mb / secs, "mb": mb}


class LoaderRun:
    """One loader configuration; `once()` times one pass from its first batch (after worker start-up)."""

    def __init__(self, shards: Path, tokenizer: Path, workers: int, batch_size: int,
                 skip_images: frozenset[int] = frozenset(), mode: str = "eval", **options):
        self.cfg = LoaderConfig(shards=str(shards), tokenizer=str(tokenizer), batch_size=batch_size, image_size=252,
                                num_workers=workers, max_text_length=96, **options)
        self.workers, self.options, self.images, self.seconds = workers, options, 0, 0.0
        self.pass_rates: list[float] = []  # images/s of each timed pass (the spread under load)
        self.skip_images, self.mode, self.epoch = skip_images, mode, 0
        if skip_images:
            self.options = {**options, "skip_images": f"{len(skip_images)} locations"}

    server_pid: int | None = None  # a local server whose CPU time counts too (--nginx)
    cpu_seconds = 0.0  # this process's CPU (all its threads) + the server's, in timed passes

    def once(self) -> None:
        t0, images = None, 0
        self.epoch += 1  # train: a new order each pass
        for batch in build_loader(self.cfg, self.mode, epoch=self.epoch, skip_images=self.skip_images):
            if t0 is None:
                t0, cpu0 = time.perf_counter(), self._cpu()
                continue
            images += int(batch["view_mask"].sum())
        seconds = time.perf_counter() - t0
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.pass_rates.append(images / seconds)
        self.cpu_seconds += self._cpu() - cpu0

    def _cpu(self) -> float:
        """CPU seconds of this process (every thread) and of the server (worker processes not counted)."""
        cpu = time.process_time()
        if self.server_pid is not None:
            fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return cpu

    def result(self) -> dict:
        ips = self.images / self.seconds
        return {"workers": self.workers, "options": self.options, "images": self.images, "seconds": self.seconds,
                "images_per_s": ips, "images_per_s_per_worker": ips / max(self.workers, 1),
                "cpu_seconds": self.cpu_seconds, "images_per_cpu_s": self.images / max(self.cpu_seconds, 1e-9),
                "pass_images_per_s": self.pass_rates}


class UpstreamRun:
    def __init__(self, data: Path):
        self.ds = UpstreamStyleDataset(data / "train_description.xlsx", data / "Street360Loc_images")
        self.images, self.seconds = 0, 0.0

    def once(self) -> None:
        t0 = time.perf_counter()
        for i in range(len(self.ds)):
            imgs, _, _ = self.ds[i]
            self.images += imgs.shape[0]
        self.seconds += time.perf_counter() - t0

    def result(self) -> dict:
        ips = self.images / self.seconds
        return {"workers": 1, "images": self.images, "seconds": self.seconds, "images_per_s": ips, "images_per_s_per_worker": ips}


def bench_sha(shards: Path, images_per_s: float, repeats: int = 20) -> dict:
    """The checksum part of verification, timed alone (less noisy than two loader passes)."""
    import hashlib
    import json

    manifest = json.loads((shards / "manifest.json").read_text())
    first = manifest["shards"][0]
    data = (shards / first["name"]).read_bytes()
    t0 = time.perf_counter()
    for _ in range(repeats):
        hashlib.sha256(data).hexdigest()
    ms = 1e3 * (time.perf_counter() - t0) / repeats
    load_ms = 1e3 * first["views"] / images_per_s
    return {"ms_per_shard": ms, "mb_per_shard": len(data) / 1e6, "shard_load_ms": load_ms, "fraction": ms / load_ms}


def read_amplification(shards: Path, batch_size: int, window: int, worlds=(1, 2, 4)) -> dict:
    """Bytes one rank fetches per epoch of the elastic order over the bytes of its samples' members:
    by range reads (each sample's headers and members) and, for comparison, by whole shards (every
    shard its samples sit in); shards touched per batch."""
    import json
    import tarfile

    from text4vpr.data.order import epoch_order, rank_share

    manifest = json.loads((shards / "manifest.json").read_text())
    counts = [e["count"] for e in manifest["shards"]]
    payload = []  # member bytes per sample, per shard
    for e in manifest["shards"]:
        sizes: dict[str, int] = {}
        with tarfile.open(shards / e["name"]) as tar:
            for info in tar:
                key = info.name.partition(".")[0]
                sizes[key] = sizes.get(key, 0) + info.size
        payload.append([sizes[k] for k in e["keys"]])
    shard, sample = epoch_order(counts, 0, 0, window)
    out = {}
    for world in worlds:
        g = batch_size * world
        steps = len(shard) // g
        if steps == 0:  # too few locations for one global batch on this many ranks
            continue
        mine = [p for j in range(steps) for p in range(*rank_share(j, 0, world, g).indices(len(shard)))]
        used = sum(payload[shard[p]][sample[p]] for p in mine)
        ranged = sum(manifest["shards"][shard[p]]["samples"][sample[p]][1] for p in mine)
        whole = sum(manifest["shards"][s]["bytes"] for s in {int(shard[p]) for p in mine})
        per_batch = np.mean([len({int(shard[p]) for p in range(*rank_share(j, 0, world, g).indices(len(shard)))})
                             for j in range(steps)])
        out[world] = {"range_reads": ranged / used, "whole_shards": whole / used, "shards_per_batch": float(per_batch)}
    return out


def cache_hits(counts: list[int], batch_size: int, window: int, worlds=(2, 4, 8), epochs: int = 4) -> dict:
    """Frozen-trunk cache under the elastic order: the share of rank 0's locations in epoch e that
    it met in an earlier epoch (cache hits) and the share of all locations its cache holds after e."""
    from text4vpr.data.order import epoch_order, rank_share

    total, out = sum(counts), {}
    offsets = np.cumsum([0, *counts])
    for world in worlds:
        g, seen, rows = batch_size * world, set(), []
        if total < g:  # not one global batch on this many ranks (a small --locations)
            continue
        for e in range(epochs):
            shard, sample = epoch_order(counts, 0, e, window)
            ids = offsets[shard] + sample
            mine = [int(ids[p]) for j in range(len(ids) // g) for p in range(*rank_share(j, 0, world, g).indices(len(ids)))]
            rows.append({"hits": sum(i in seen for i in mine) / len(mine), "cached": 0.0})
            seen.update(mine)
            rows[-1]["cached"] = len(seen) / total
        out[world] = rows
    return out


def bench_regroup(xlsx: str, items: int = 200) -> dict | None:
    """Upstream's per-item DataFrame regroup on the real 20,004-row train file (no images)."""
    import pandas as pd

    if not Path(xlsx).exists():
        return None
    df = pd.read_excel(xlsx)
    keys = list(df.groupby("index").groups.keys())[:items]
    t0 = time.perf_counter()
    for k in keys:
        df.groupby("index").get_group(k).sort_values("pos")
    per_item = (time.perf_counter() - t0) / len(keys)
    return {"rows": len(df), "ms_per_location": 1e3 * per_item, "ms_per_image": 1e3 * per_item / 4}


@contextlib.contextmanager
def _stopping(server):
    try:
        yield server
    finally:
        server.stop()


def _url_runs(url: str, cache: Path, tok: Path, bs: int, workers: int, server_pid: int | None) -> dict:
    """The local uint8 252 px runs, from a URL: cold (no cache), and from a warmed local cache."""
    warm = LoaderRun(url, tok, 0, bs, image_dtype="uint8", cache_dir=str(cache))
    warm.once()  # fills the cache (not counted: its counters are reset)
    warm.images, warm.seconds, warm.cpu_seconds = 0, 0.0, 0.0
    cold = LoaderRun(url, tok, 0, bs, image_dtype="uint8")
    cold.server_pid = server_pid
    train = LoaderRun(url, tok, 0, bs, mode="train", image_dtype="uint8")
    train.server_pid = server_pid
    return {
        "u8_252_1w_url": ("loader uint8, 252px shards from the URL (no cache), 1 in-process worker", cold),
        "u8_252_1w_url_cached": ("loader uint8, 252px shards from the URL through a warm local cache, 1 in-process worker",
                                 warm),
        "u8_252_w_url": (f"loader uint8, 252px shards from the URL (no cache), {workers} DataLoader workers",
                         LoaderRun(url, tok, workers, bs, image_dtype="uint8")),
        "u8_252_1w_train_url": ("train: elastic order, per-sample range reads from the URL (no cache), 1 in-process worker",
                                train),
    }


def _url_report(args, runs: dict, results: dict) -> int:
    """`--url-only`: the local and URL runs side by side, URL / local per worker."""
    pairs = {"u8_252_1w_url": "u8_252_1w", "u8_252_1w_url_cached": "u8_252_1w", "u8_252_w_url": "u8_252_w",
             "u8_252_1w_train_url": "u8_252_1w_train_elastic"}
    print(f"{'loading (images/s, 252x252 output)':100s} {'total':>8s} {'/worker':>8s} {'vs local':>8s} "
          f"{'img/CPU-s':>9s} {'vs local':>8s}")
    for key, (label, _) in runs.items():
        r = results[key]
        local = results.get(pairs.get(key, key))
        ratio = r["images_per_s_per_worker"] / local["images_per_s_per_worker"]
        per_cpu = (f"{r['images_per_cpu_s']:9.1f} {r['images_per_cpu_s'] / local['images_per_cpu_s']:7.2f}x"
                   if r["workers"] == 0 else "")  # DataLoader worker processes' CPU is not counted
        print(f"{label:100s} {r['images_per_s']:8.1f} {r['images_per_s_per_worker']:8.1f} {ratio:7.2f}x {per_cpu}")
    print("img/CPU-s: images per CPU second of the loading process (all its threads) and, for the cold URL run, nginx")
    spread = {}
    for key, local in pairs.items():  # the rounds are interleaved: round i of the URL run against round i of local
        if key not in results:
            continue
        per_pass = spread[key] = [a / b for a, b in zip(results[key]["pass_images_per_s"], results[local]["pass_images_per_s"])]
        print(f"{key} / {local}, pass by pass: {min(per_pass):.2f}x .. {max(per_pass):.2f}x, median "
              f"{float(np.median(per_pass)):.2f}x over {len(per_pass)} passes")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_1min_at_end": os.getloadavg()[0]},
           "args": vars(args), "loader": {key: {"label": runs[key][0], **results[key]} for key in runs},
           "url_vs_local_per_worker": {k: results[k]["images_per_s_per_worker"] / results[v]["images_per_s_per_worker"]
                                       for k, v in pairs.items() if k in results},
           "url_vs_local_pass_by_pass": spread}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=120, help="synthetic locations (x4 images at 640x640)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="build processes / loader workers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--passes", type=int, default=3, help="timed rounds; each runs every loading configuration once")
    p.add_argument("--out", default="benchmarks/results/bench_data_cpu.json")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temp folder)")
    p.add_argument("--train-only", action="store_true",
                   help="only the train order: today's sequential reader (fixed_shard_assignment) against the elastic order")
    p.add_argument("--real-train-xlsx", default="../shared/street360loc/train_description.xlsx",
                   help="real annotation file for the upstream regroup cost (skipped if absent)")
    p.add_argument("--url", default=None, help="URL prefix serving --workdir: also read its 252 px shards from there")
    p.add_argument("--nginx", action="store_true", help="serve the work folder with Debian's nginx on loopback (--url)")
    p.add_argument("--url-only", action="store_true", help="only the uint8 252 px loader runs, local and from the URL")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per-core figures: one thread per process
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(args.workdir or tmp)
        data = work / "synth"
        _, synth_s = _timed(lambda: write_synthetic(data, SynthConfig(locations=args.locations, seed=0, image_size=640,
                                                                      split_fractions=(1.0, 0.0, 0.0), workers=args.workers)))
        build_orig = bench_build(data, work / "shards_orig", None, args.workers) if not args.url_only else None
        build_252 = bench_build(data, work / "shards_252", 252, args.workers)
        tok = work / "tok"
        train_tokenizer(shard_descriptions(work / "shards_252"), tok, vocab_size=500)
        s252, s640, bs = work / "shards_252", work / "shards_orig", args.batch_size
        every = frozenset(i for b in build_loader(LoaderRun(s252, tok, 0, bs).cfg, "eval") for i in b["index"].tolist())
        train_runs = {  # the train order, 1 in-process worker, uint8 252px, verified (sha256 per shard / per sample)
            "u8_252_1w_train_sequential": ("train: sequential reader (slot streams whole shards, shuffle buffer 256; "
                                           "fixed_shard_assignment=true)",
                                           LoaderRun(s252, tok, 0, bs, mode="train", image_dtype="uint8",
                                                     fixed_shard_assignment=True)),
            "u8_252_1w_train_elastic": ("train: elastic order (shuffle_window=8, per-sample range reads)",
                                        LoaderRun(s252, tok, 0, bs, mode="train", image_dtype="uint8")),
        }
        runs = train_runs if args.train_only else {  # key: (label, run)
            "upstream": ("upstream-style (DataFrame per item, PIL from folder, 640->252, normalise to float)",
                         UpstreamRun(data)),
            "f32_252_1w": ("loader float32 (normalised in loader), 252px shards, 1 in-process worker",
                           LoaderRun(s252, tok, 0, bs, image_dtype="float32")),
            "u8_252_1w": ("loader uint8 (normalised on the device by the trainer, not timed), 252px shards, 1 in-process worker",
                          LoaderRun(s252, tok, 0, bs, image_dtype="uint8")),
            "u8_252_1w_unverified": ("loader uint8, 252px shards, 1 in-process worker, verify=False (no sha256 per shard read)",
                                     LoaderRun(s252, tok, 0, bs, image_dtype="uint8", verify=False)),
            "u8_252_cached_1w": ("loader uint8, every location in the trainer's frozen-trunk cache (no JPEG decode), "
                                 "252px shards, 1 in-process worker",
                                 LoaderRun(s252, tok, 0, bs, skip_images=every, image_dtype="uint8")),
            "u8_640_1w": ("loader uint8, 640px shards (exact decode + resize), 1 in-process worker",
                          LoaderRun(s640, tok, 0, bs, image_dtype="uint8")),
            "u8_fast_640_1w": ("loader uint8 + fast_decode, 640px shards, 1 in-process worker",
                               LoaderRun(s640, tok, 0, bs, image_dtype="uint8", fast_decode=True)),
            "f32_252_w": (f"loader float32, 252px shards, {args.workers} DataLoader workers",
                          LoaderRun(s252, tok, args.workers, bs, image_dtype="float32")),
            "u8_252_w": (f"loader uint8, 252px shards, {args.workers} DataLoader workers",
                         LoaderRun(s252, tok, args.workers, bs, image_dtype="uint8")),
            **train_runs,
        }
        if args.nginx:
            from tests.http_servers import Nginx

            server = stack.enter_context(_stopping(Nginx(work / "nginx")))
            args.url = server.serve(work, "bench")
        if args.url:
            pid = server.proc.pid if args.nginx else None
            runs.update(_url_runs(args.url.rstrip("/") + "/shards_252", work / "fetch_cache", tok, bs, args.workers, pid))
        if args.url_only:
            runs = {k: v for k, v in runs.items() if k in ("u8_252_1w", "u8_252_w", "u8_252_1w_train_elastic") or "_url" in k}
        if args.train_only:
            runs = {"upstream": ("upstream-style (DataFrame per item, PIL from folder, 640->252, normalise to float)",
                                 UpstreamRun(data)), **train_runs}
        for _ in range(args.passes):  # interleaved: each round runs every configuration once
            for _, run in runs.values():
                run.once()
        results = {key: run.result() for key, (_, run) in runs.items()}
        sha = bench_sha(s252, results["u8_252_1w_unverified"]["images_per_s"]) if not (args.url_only or args.train_only) else None
        amplification = read_amplification(s252, bs, LoaderConfig.shuffle_window)
        counts = [e["count"] for e in __import__("json").loads((s252 / "manifest.json").read_text())["shards"]]
        hits = cache_hits(counts, bs, LoaderConfig.shuffle_window)
    regroup = bench_regroup(args.real_train_xlsx)
    if "upstream" not in results:
        return _url_report(args, runs, results)
    base = results["upstream"]["images_per_s_per_worker"]
    print(f"synthetic data: {args.locations} locations x 4 views at 640x640 (written in {synth_s:.1f} s)")
    print(f"{'build':58s} {'loc/s':>8s} {'MB/s':>8s} {'MB':>7s}")
    for name, b in (("shards build, original bytes", build_orig), ("shards build, --resize 252", build_252)):
        label = f"{name} ({b['workers']} workers)"
        print(f"{label:58s} {b['locations_per_s']:8.1f} {b['mb_per_s']:8.1f} {b['mb']:7.1f}")
    print(f"{'loading (images/s, 252x252 output)':100s} {'total':>8s} {'/worker':>8s} {'ratio':>7s}")
    for key, (label, _) in runs.items():
        r = results[key]
        print(f"{label:100s} {r['images_per_s']:8.1f} {r['images_per_s_per_worker']:8.1f} {r['images_per_s_per_worker'] / base:6.2f}x")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "gpu": torch.cuda.is_available(),
                    "loadavg_1min_at_end": os.getloadavg()[0]},
        "args": vars(args), "synth_seconds": synth_s,
        "build": {"original": build_orig, "resize_252": build_252},
        "loader": {key: {"label": runs[key][0], **results[key]} for key in runs if key != "upstream"},
        "upstream": results["upstream"],
        "ratio_per_worker_vs_upstream": {key: results[key]["images_per_s_per_worker"] / base for key in runs if key != "upstream"},
    }
    trained = "u8_252_1w_train_elastic" in results  # not in a --url-only run
    ratio = (results["u8_252_1w_train_elastic"]["images_per_s"] / results["u8_252_1w_train_sequential"]["images_per_s"]
             if trained else None)
    if trained:
        print(f"train order: elastic / sequential images/s per core = {ratio:.3f}")
    for world, a in amplification.items():
        print(f"read amplification, rank 0 of {world}: range reads {a['range_reads']:.4f}x, whole shards "
              f"{a['whole_shards']:.2f}x; {a['shards_per_batch']:.1f} shards per batch")
    result["train_order"] = {"elastic_over_sequential": ratio, "read_amplification": amplification, "cache_hits": hits}
    if args.train_only:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
        return 0
    overhead = results["u8_252_1w_unverified"]["images_per_s"] / results["u8_252_1w"]["images_per_s"] - 1
    print(f"shard verification (sha256 of every shard read, split/size checks) costs {100 * overhead:+.1f} % "
          "(uint8 252px, 1 worker: verify=True against verify=False, interleaved passes)")
    print(f"sha256 alone: {sha['ms_per_shard']:.2f} ms per {sha['mb_per_shard']:.2f} MB shard = {100 * sha['fraction']:.2f} % "
          f"of that shard's unverified loading time")
    result["verify_overhead"] = {"interleaved": overhead, "sha256_alone": sha}
    if regroup is not None:
        print(f"upstream regroup alone on the real {regroup['rows']}-row train file: {regroup['ms_per_location']:.2f} ms/location "
              f"({regroup['ms_per_image']:.2f} ms/image, not included above: the synthetic frame is small)")
    result["upstream_regroup_real_train"] = regroup
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
