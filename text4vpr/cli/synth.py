"""`text4vpr synth`: write a synthetic Street360Loc (xlsx + images) in the real layout, plus a
tokenizer trained on its train descriptions, and print the commands that train on it."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from text4vpr.cli.arg_types import fraction, out_folder, positive_int

SPLITS = ("train", "val", "test")
TOKENIZER_VOCAB = 1000  # as the trainer's embedded demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=out_folder, help="output folder")
    p.add_argument("--locations", type=positive_int, default=300, help="number of locations (all splits)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the scenes and descriptions")
    p.add_argument("--image-size", type=positive_int, default=640, help="square image side in px")
    p.add_argument("--refusal-rate", type=fraction, default=0.0, help="fraction of refusal-like descriptions")
    p.add_argument("--workers", type=positive_int, default=1, help="rendering processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def next_commands(out: str) -> list[str]:
    """The shard builds and the training run for a synth folder, ready to paste."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    root = Path(out)
    cmds = [f"text4vpr shards build --xlsx {q(root / f'{s}_description.xlsx')} --images {q(root / 'Street360Loc_images')} "
            f"--out {q(root / 'shards' / s)}" for s in SPLITS]
    shards = " ".join(f"data.{s}_shards={q(root / 'shards' / s)}" for s in SPLITS)
    cmds.append(f"text4vpr train --config demo data.synthetic.locations=0 {shards} "
                f"data.loader.tokenizer={q(root / 'tokenizer')} train.output_dir={q(root / 'run')}")
    return cmds


def run(args: argparse.Namespace) -> int:
    from text4vpr.data.synthetic import SynthConfig, plan_locations, write_synthetic
    from text4vpr.data.tokenizer import train_tokenizer

    cfg = SynthConfig(
        locations=args.locations, seed=args.seed, image_size=args.image_size,
        refusal_rate=args.refusal_rate, workers=args.workers,
    )
    summary = write_synthetic(args.out, cfg, progress=not args.no_progress)
    texts = [v["text"] for loc in plan_locations(cfg) if loc.split == "train" for v in loc.views]
    train_tokenizer(texts, Path(args.out) / "tokenizer", vocab_size=TOKENIZER_VOCAB)
    splits = ", ".join(
        f"{name} {s['locations']} (index {s['first_index']}..{s['last_index']})" for name, s in summary["splits"].items()
    )
    print(f"synth: {args.locations} locations at {args.image_size}px in {args.out}: {splits}; "
          f"tokenizer in {Path(args.out) / 'tokenizer'}")
    print("next: build the shards, then train on them:")
    for cmd in next_commands(args.out):
        print(f"  {cmd}")
    print("the demo itself (its own synthetic data; the same run as `accelerate launch train.py`): text4vpr train")
    return 0
