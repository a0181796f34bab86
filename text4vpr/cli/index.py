"""`text4vpr index build|queries --model DIR --shards DIR --out PATH`: a split's database image
vectors (an index folder, one part per rank under `accelerate launch -m text4vpr`) or its
descriptions' vectors (a query file for `eval-embeddings`)."""

from __future__ import annotations

import argparse

from text4vpr.cli._retrieval_common import (
    add_model_loader_args, check_loader_args, eval_loader, init_distributed, is_main_rank, load_model_on, precision_context,
    show_progress,
)
from text4vpr.cli.arg_types import out_file, out_folder
from text4vpr.cli.approx_args import add_approximate_args, approx_config, approximate_summary, build_approximate_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser(
        "build", help="encode the database images of a split into an index folder",
        description="Encode every location's images of a split into an index folder (header + one part per rank), "
                    "the database of `text4vpr localize`, `eval --index` and `eval-embeddings --database`.")
    add_model_loader_args(build)
    build.add_argument("--out", required=True, type=out_folder, help="index folder to write")
    build.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="stored vector dtype (bfloat16 halves the size; search accumulates in fp32)")
    add_approximate_args(build)
    queries = sub.add_parser(
        "queries", help="encode the descriptions of a split into a query file for `text4vpr eval-embeddings`",
        description="Encode every location's descriptions of a split (text tower only) into one .safetensors "
                    "file (embeddings, view_mask, coords, index), the --queries input of `text4vpr eval-embeddings`.")
    add_model_loader_args(queries)
    queries.add_argument("--out", required=True, type=out_file, help="query file to write (.safetensors)")


def run(args: argparse.Namespace) -> int:
    if args.index_command == "build" and args.approximate:
        approx_config(args)  # its flag mistakes, and a missing faiss, before any encoding
    return _encode(args, _queries if args.index_command == "queries" else _build)


def _encode(args: argparse.Namespace, write) -> int:
    """Load the model on this rank's device, then `write(args, model, loader, device)` -> the line to print."""
    check_loader_args(args)  # before any model is loaded
    device = init_distributed()
    model = load_model_on(args.model, device)
    with precision_context(args.precision, device):
        line = write(args, model, eval_loader(args, model), device)
    if is_main_rank():
        print(line)
    return 0


def _queries(args: argparse.Namespace, model, loader, device) -> str:
    from text4vpr.retrieval.queries import encode_queries

    summary = encode_queries(model, loader, args.out, device=device, show_progress=show_progress(args),
                             shards=args.shards)
    return (f"queries {args.out}: {summary['count']} locations, D={summary['embed_dim']}; evaluate with "
            f"`text4vpr eval-embeddings --queries {args.out} --database INDEX --out REPORT`")


def _build(args: argparse.Namespace, model, loader, device) -> str:
    from text4vpr.retrieval.index import build_index

    header = build_index(model, loader, args.out, dtype=args.dtype, show_progress=show_progress(args),
                         shards=args.shards)
    if args.approximate:
        header = build_approximate_from_args(args, model, loader, device)
    return (f"index {args.out}: {header['count']} locations, D={header['embed_dim']}, "
            f"{len(header['parts'])} part(s), {header['dtype']}{approximate_summary(header)}")
