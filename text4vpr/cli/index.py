"""`text4vpr index build --model DIR --shards DIR --out INDEX`: database image vectors of a split.

Launch with `accelerate launch -m text4vpr index build ...` to encode on several GPUs; each
rank writes its own part.
"""

from __future__ import annotations

import argparse

from text4vpr.cli._retrieval_common import (
    add_model_loader_args, check_shards, eval_loader, fail, init_distributed, is_main_rank, load_model_on, precision_context,
    show_progress,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="encode the database images of a split into an index folder")
    add_model_loader_args(build)
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="stored vector dtype (bfloat16 halves the size; search accumulates in fp32)")


def run(args: argparse.Namespace) -> int:
    from text4vpr.retrieval.index import build_index

    check_shards(args.shards)  # before any model is loaded
    device = init_distributed()
    try:
        model = load_model_on(args.model, device)
        with precision_context(args.precision, device):
            header = build_index(model, eval_loader(args, model), args.out, dtype=args.dtype,
                                 show_progress=show_progress(args))
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if is_main_rank():
        print(f"index {args.out}: {header['count']} locations, D={header['embed_dim']}, "
              f"{len(header['parts'])} part(s), {header['dtype']}")
    return 0
