"""`text4vpr synth`: write a synthetic Street360Loc (xlsx + images) in the real layout."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of locations, images, workers)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--locations", type=positive_int, default=300, help="number of locations (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=positive_int, default=640, help="square image side in px")
    p.add_argument("--refusal-rate", type=float, default=0.0, help="fraction of refusal-like descriptions")
    p.add_argument("--workers", type=positive_int, default=1, help="rendering processes")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from text4vpr.data.synthetic import SynthConfig, write_synthetic

    cfg = SynthConfig(
        locations=args.locations, seed=args.seed, image_size=args.image_size,
        refusal_rate=args.refusal_rate, workers=args.workers,
    )
    summary = write_synthetic(args.out, cfg, progress=not args.no_progress)
    splits = ", ".join(
        f"{name} {s['locations']} (index {s['first_index']}..{s['last_index']})" for name, s in summary["splits"].items()
    )
    print(f"synth: {args.locations} locations at {args.image_size}px in {args.out}: {splits}")
    return 0
