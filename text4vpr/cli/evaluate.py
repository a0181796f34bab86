"""`text4vpr eval --model DIR --shards DIR [--index INDEX] [--mode M] --out DIR`.

Top-k accuracy within r metres on a split (SPEC), written as metrics.json, metrics.md and
accuracy_vs_radius.png. Runs single-process or under `accelerate launch` (ranks share the
encoding; rank 0 writes the report).
"""

from __future__ import annotations

import argparse

from text4vpr.cli._retrieval_common import (
    add_index_risk_args, add_mode_arg, add_model_loader_args, check_loader_args, eval_loader, fail, init_distributed, is_main_rank, load_model_on,
    precision_context, show_progress,
)


def add_ks_radii(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="k values")
    parser.add_argument("--radii", type=float, nargs="+", default=[5, 10, 15, 30], help="radii in metres")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="search kernel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_loader_args(parser)
    parser.add_argument("--index", default=None, help="prebuilt index of the database (default: encode the images)")
    add_index_risk_args(parser)
    parser.add_argument("--allow-disjoint", action="store_true",
                        help="score queries whose locations are not in the index's database (they can only "
                             "match by distance; by default an error)")
    add_mode_arg(parser)
    add_ks_radii(parser)
    parser.add_argument("--out", required=True, help="report folder")


def _this_rank_rows(path: str) -> tuple[int, int]:
    """The index rows this rank searches: each rank reads only those embeddings."""
    from text4vpr.retrieval.index import rank_rows, read_header
    from text4vpr.utils.distributed import distributed_world

    rank, world = distributed_world()
    return rank_rows(int(read_header(path)["count"]), rank, world)


def run(args: argparse.Namespace) -> int:
    from text4vpr.retrieval.evaluate import evaluate
    from text4vpr.retrieval.index import load_index, shards_digest, weights_digest
    from text4vpr.retrieval.report import markdown_table, write_report

    check_loader_args(args)  # before any model is loaded
    device = init_distributed()
    try:
        model = load_model_on(args.model, device)
        index = None
        if args.index:
            index = load_index(args.index, model.config_hash(), model.embed_dim, rows=_this_rank_rows(args.index),
                               weights_digest=weights_digest(model), shards_digest=shards_digest(args.shards) or None,
                               allow_mismatch=args.allow_index_mismatch)
        with precision_context(args.precision, device):
            metrics = evaluate(model, eval_loader(args, model), args.ks, args.radii, args.mode, index=index,
                               backend=args.backend, device=device, show_progress=show_progress(args),
                               allow_disjoint=args.allow_disjoint)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if is_main_rank():
        paths = write_report(metrics, args.out)
        print(markdown_table(metrics), end="")
        print(f"wrote {paths['json']}, {paths['table']}, {paths['plot']}")
    return 0
