"""`text4vpr shards build|inspect|index-offsets`: pack Street360Loc into WebDataset shards, check them."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from text4vpr.cli.arg_types import fraction, int_between, non_negative_int, out_folder, positive_int
from text4vpr.data.image_checks import DEFAULT_MAX_PIXELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="validate annotation files and write shards + manifest.json")
    b.add_argument("--xlsx", required=True, nargs="+", help="*_description.xlsx file(s), read in order")
    b.add_argument("--images", required=True, help="folder of {index:06d}_{pos}.jpg")
    b.add_argument("--out", required=True, type=out_folder, help="shard folder")
    b.add_argument("--resize", type=int_between(8, 16384), default=None, help="resize views to this square size (default: keep bytes)")
    b.add_argument("--jpeg-quality", type=int_between(1, 95), default=90, help="quality when re-encoding with --resize")
    b.add_argument("--workers", type=positive_int, default=1, help="processes writing shards")
    b.add_argument("--max-count", type=positive_int, default=64, help="locations per shard")
    b.add_argument("--max-size", type=positive_int, default=None, help="bytes per shard (estimated from source sizes)")
    b.add_argument("--prefix", default="shard", help="shard file name prefix")
    b.add_argument("--min-views", type=int_between(1, 4), default=1, help="skip locations with fewer valid views")
    b.add_argument("--strict", action="store_true", help="any dropped view or skipped location is an error")
    b.add_argument("--exclude-from", nargs="+", default=[], metavar="XLSX",
                   help="skip (and report) locations whose index is in these files, e.g. val minus train")
    b.add_argument("--drop-overlap", action="store_true",
                   help="with several --xlsx: write only the LAST file, minus indices in the earlier ones "
                        "(same as --xlsx LAST --exclude-from EARLIER...)")
    b.add_argument("--refusal-pattern", action="append", default=None, help="regex for refusal-like text (repeatable; replaces defaults)")
    b.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"drop (and report) views with more pixels (default {DEFAULT_MAX_PIXELS} = 4096x4096)")
    b.add_argument("--short-chars", type=non_negative_int, default=50, help="flag descriptions shorter than this")
    b.add_argument("--report", default=None, help="also write the validation report here (default OUT/report.json)")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier, different build in --out")
    b.add_argument("--max-skipped-share", type=fraction, default=0.05,
                   help="refuse the build when more than this share of the locations is skipped (missing images, "
                        "...); 1 allows any (default 0.05)")
    b.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("inspect", help="verify checksums and counts; show a location")
    i.add_argument("dir", help="shard folder, or its URL prefix (http(s)://, s3://, gs://)")
    i.add_argument("--index", type=int, default=None, help="print this location's coordinates and descriptions")
    i.add_argument("--write-images", default=None, help="with --index: write its views to this folder")
    x = sub.add_parser("index-offsets", help="add per-sample byte offsets to a folder built before they were recorded "
                                             "(checks each shard's sha256; rewrites only manifest.json)")
    x.add_argument("dir", help="shard folder")


def run(args: argparse.Namespace) -> int:
    return {"build": _build, "inspect": _inspect, "index-offsets": _index_offsets}[args.action](args)


def _index_offsets(args: argparse.Namespace) -> int:
    from text4vpr.data.sample_index import index_offsets

    manifest = index_offsets(args.dir)
    n = sum(len(s["samples"]) for s in manifest["shards"])
    print(f"{args.dir}: byte offsets of {n} samples in {len(manifest['shards'])} shards added to manifest.json")
    return 0


def _build(args: argparse.Namespace) -> int:
    from text4vpr.cli.errors import UsageError
    from text4vpr.data.shards import BuildOptions, build_shards
    from text4vpr.data.street360loc import DEFAULT_REFUSAL_PATTERNS, ReadOptions
    from text4vpr.utils.atomic import atomic_write_json

    images = Path(args.images)
    if not images.is_dir() or next(images.glob("*_[0-9].jpg"), None) is None:
        why = "no such folder" if not images.is_dir() else "no {index:06d}_{pos}.jpg views in this folder"
        raise UsageError(f"--images {args.images}: {why}; pass the folder that holds 000001_1.jpg, ...")
    opts = BuildOptions(
        resize=args.resize, jpeg_quality=args.jpeg_quality, max_count=args.max_count, max_size=args.max_size,
        workers=args.workers, prefix=args.prefix, overwrite=args.overwrite, max_skipped_share=args.max_skipped_share,
    )
    xlsx, exclude = _split_inputs(args)
    read = ReadOptions(
        min_views=args.min_views, strict=args.strict, exclude_from=exclude,
        refusal_patterns=tuple(args.refusal_pattern) if args.refusal_pattern else DEFAULT_REFUSAL_PATTERNS,
        short_chars=args.short_chars, max_pixels=args.max_pixels,
    )
    manifest = build_shards(xlsx, args.images, args.out, opts, read, progress=not args.no_progress)
    report_path = Path(args.report) if args.report else Path(args.out) / "report.json"
    atomic_write_json(report_path, manifest["report"])
    print(f"report: {report_path} ({_report_line(manifest['report']['counts'])})")
    return 0


def _split_inputs(args: argparse.Namespace) -> tuple[list[str], tuple[str, ...]]:
    """(files to write, files whose indices are excluded): --drop-overlap writes the last file only."""
    if args.drop_overlap and len(args.xlsx) > 1:
        return args.xlsx[-1:], tuple(args.xlsx[:-1] + args.exclude_from)
    return args.xlsx, tuple(args.exclude_from)


def plain_name(text: str) -> str:
    """A string from shard contents made safe as one file name: no separators, no dots-only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_")
    return name or "unnamed"


def _report_line(c: dict) -> str:
    flags = ", ".join(f"{k} {v}" for k, v in sorted(c["flags"].items())) or "no flags"
    return (f"rows in {c['rows_in']} = written {c['rows_written']} + dropped {c['rows_dropped']} "
            f"+ in skipped locations {c['rows_in_skipped_locations']}; {flags}")


def _inspect(args: argparse.Namespace) -> int:
    from text4vpr.cli.errors import UsageError
    from text4vpr.data.shard_reader import find_location, verify_shards
    from text4vpr.utils.atomic import atomic_write_bytes

    result = verify_shards(args.dir)
    t = result["totals"]
    status = "all checksums OK" if result["ok"] else f"{len(result['problems'])} problem(s)"
    print(f"inspect: {t['shards']} shards, {t['locations']} locations, {t['views']} views, {t['bytes'] / 1e6:.1f} MB: {status}")
    print(f"report: {_report_line(result['report']) if result['report'] else 'none in the manifest'}")
    for p in result["problems"]:
        print(f"  {p}")
    if args.index is not None:
        found = find_location(args.dir, args.index)
        if not found:
            raise UsageError(f"--index {args.index}: no such location in {args.dir}")
        for shard, meta, images in found:
            print(json.dumps({"shard": shard, "index": meta["index"], "split": meta["split"], "xyz": meta["xyz"],
                              "view_mask": meta["view_mask"]}))
            for pos, text in zip(meta["positions"], meta["descriptions"]):
                print(f"  pos {pos}: {text}")
            if args.write_images:
                for pos, data in images.items():
                    path = Path(args.write_images) / f"{plain_name(meta['split'])}_{int(meta['index']):06d}_{int(pos)}.jpg"
                    atomic_write_bytes(path, data)
                    print(f"  wrote {path}")
    return 0 if result["ok"] else 1
