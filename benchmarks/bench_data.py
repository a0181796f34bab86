#!/usr/bin/env python
"""Data-path benchmark on synthetic 640x640 Street360Loc.

Measures in one run: (a) shard build rate with and without --resize 252, (b) loader
images/s per worker from shards (one in-process worker, and the whole DataLoader with
--workers processes), (c) a faithful re-implementation of the upstream loading path
(pandas DataFrame re-grouped per item, PIL open from the folder, resize 252, normalise) on
the same data, one process. Prints a table with ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from text4vpr.data.loader import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig, build_loader  # noqa: E402
from text4vpr.data.shards import BuildOptions, build_shards, shard_descriptions  # noqa: E402
from text4vpr.data.synthetic import SynthConfig, write_synthetic  # noqa: E402
from text4vpr.data.tokenizer import train_tokenizer  # noqa: E402
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


def bench_loader(shards: Path, tokenizer: Path, workers: int, batch_size: int, passes: int) -> dict:
    cfg = LoaderConfig(shards=str(shards), tokenizer=str(tokenizer), batch_size=batch_size, image_size=252,
                       num_workers=workers, max_text_length=96)
    images, secs = 0, 0.0
    for _ in range(passes):  # steady state: the clock starts at the first batch (after worker start-up)
        t0 = None
        for batch in build_loader(cfg, "eval"):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            images += int(batch["view_mask"].sum())
        secs += time.perf_counter() - t0
    per_worker = images / secs / max(workers, 1)
    return {"workers": workers, "images": images, "seconds": secs, "images_per_s": images / secs, "images_per_s_per_worker": per_worker}


def bench_upstream(data: Path, passes: int) -> dict:
    ds = UpstreamStyleDataset(data / "train_description.xlsx", data / "Street360Loc_images")
    images, secs = 0, 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(len(ds)):
            imgs, _, _ = ds[i]
            images += imgs.shape[0]
        secs += time.perf_counter() - t0
    return {"workers": 1, "images": images, "seconds": secs, "images_per_s": images / secs, "images_per_s_per_worker": images / secs}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=120, help="synthetic locations (x4 images at 640x640)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="build processes / loader workers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--passes", type=int, default=2, help="loader passes over the data (timed)")
    p.add_argument("--out", default="benchmarks/results/bench_data_cpu.json")
    p.add_argument("--workdir", default=None, help="keep data here (default: a temp folder)")
    p.add_argument("--real-train-xlsx", default="../shared/street360loc/train_description.xlsx",
                   help="real annotation file for the upstream regroup cost (skipped if absent)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per-core figures: one thread per process
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = work / "synth"
        _, synth_s = _timed(lambda: write_synthetic(data, SynthConfig(locations=args.locations, seed=0, image_size=640,
                                                                      split_fractions=(1.0, 0.0, 0.0), workers=args.workers)))
        build_orig = bench_build(data, work / "shards_orig", None, args.workers)
        build_252 = bench_build(data, work / "shards_252", 252, args.workers)
        tok = work / "tok"
        train_tokenizer(shard_descriptions(work / "shards_252"), tok, vocab_size=500)
        loader_1 = bench_loader(work / "shards_252", tok, 0, args.batch_size, args.passes)
        loader_640 = bench_loader(work / "shards_orig", tok, 0, args.batch_size, args.passes)
        loader_w = bench_loader(work / "shards_252", tok, args.workers, args.batch_size, args.passes)
        upstream = bench_upstream(data, args.passes)
    regroup = bench_regroup(args.real_train_xlsx)
    base = upstream["images_per_s_per_worker"]
    rows = [
        ("upstream-style loader (pandas group + PIL folder, 640->252)", upstream),
        ("text4vpr loader, 252px shards, 1 in-process worker", loader_1),
        ("text4vpr loader, 640px shards (decode+resize), 1 worker", loader_640),
        (f"text4vpr loader, 252px shards, {args.workers} workers", loader_w),
    ]
    print(f"synthetic data: {args.locations} locations x 4 views at 640x640 (written in {synth_s:.1f} s)")
    print(f"{'build':58s} {'loc/s':>8s} {'MB/s':>8s} {'MB':>7s}")
    for name, b in (("shards build, original bytes", build_orig), ("shards build, --resize 252", build_252)):
        label = f"{name} ({b['workers']} workers)"
        print(f"{label:58s} {b['locations_per_s']:8.1f} {b['mb_per_s']:8.1f} {b['mb']:7.1f}")
    print(f"{'loading (images/s)':58s} {'total':>8s} {'/worker':>8s} {'ratio':>7s}")
    for name, r in rows:
        print(f"{name:58s} {r['images_per_s']:8.1f} {r['images_per_s_per_worker']:8.1f} {r['images_per_s_per_worker'] / base:6.2f}x")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "gpu": torch.cuda.is_available()},
        "args": vars(args), "synth_seconds": synth_s,
        "build": {"original": build_orig, "resize_252": build_252},
        "loader": {"shards_252_1worker": loader_1, "shards_640_1worker": loader_640, f"shards_252_{args.workers}workers": loader_w},
        "upstream": upstream,
        "ratio_per_worker_vs_upstream": {"shards_252": loader_1["images_per_s_per_worker"] / base,
                                         "shards_640": loader_640["images_per_s_per_worker"] / base},
    }
    if regroup is not None:
        print(f"upstream regroup alone on the real {regroup['rows']}-row train file: {regroup['ms_per_location']:.2f} ms/location "
              f"({regroup['ms_per_image']:.2f} ms/image, not included above: the synthetic frame is small)")
    result["upstream_regroup_real_train"] = regroup
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
