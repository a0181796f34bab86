"""`text4vpr eval --model DIR --shards DIR [--index INDEX] [--mode M] --out DIR`.

Top-k accuracy within r metres on a split (docs/method.md), written as metrics.json, report.md
and accuracy_vs_radius.png; `--html` adds report.html (charts, map, gallery of the worst queries). Runs single-process or under `accelerate launch` (ranks share the
encoding; rank 0 writes the report).
"""

from __future__ import annotations

import argparse

from text4vpr.cli._retrieval_common import (
    add_exact_arg, add_index_risk_args, add_mode_arg, add_model_loader_args, check_loader_args, eval_loader, init_distributed, is_main_rank, load_model_on,
    precision_context, show_progress,
)
from text4vpr.cli.errors import fail


def add_ks_radii(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="k values")
    parser.add_argument("--radii", type=float, nargs="+", default=[5, 10, 15, 30], help="radii in metres")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="search kernel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_loader_args(parser)
    parser.add_argument("--index", default=None, help="prebuilt index of the database (default: encode the images)")
    add_index_risk_args(parser)
    add_exact_arg(parser)
    parser.add_argument("--allow-disjoint", action="store_true",
                        help="score queries whose locations are not in the index's database (they can only "
                             "match by distance; by default an error)")
    add_mode_arg(parser)
    add_ks_radii(parser)
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--html", action="store_true", help="also write report.html: map, charts, failure gallery")
    parser.add_argument("--gallery", type=int, default=40, help="worst queries shown in report.html (default 40)")


def _this_rank_rows(path: str) -> tuple[int, int]:
    """The index rows this rank searches: each rank reads only those embeddings."""
    from text4vpr.retrieval.index import rank_rows, read_header
    from text4vpr.utils.distributed import distributed_world

    rank, world = distributed_world()
    return rank_rows(int(read_header(path)["count"]), rank, world)


def run(args: argparse.Namespace) -> int:
    from text4vpr.retrieval.evaluate import evaluate
    from text4vpr.retrieval.approx_load import load_search_index
    from text4vpr.retrieval.provenance import shards_digest, weights_digest
    from text4vpr.retrieval.report import markdown_table, write_report

    if args.gallery < 0:
        return fail(f"--gallery must be >= 0 (worst queries shown in report.html), got {args.gallery}")
    check_loader_args(args)  # before any model is loaded
    device = init_distributed()
    try:
        model = load_model_on(args.model, device)
        index = None
        if args.index:
            index = load_search_index(args.index, model.config_hash(), model.embed_dim, exact=args.exact,
                                      rows=_this_rank_rows(args.index), weights_digest=weights_digest(model),
                                      shards_digest=shards_digest(args.shards) or None,
                                      allow_mismatch=args.allow_index_mismatch)
        with precision_context(args.precision, device):
            metrics = evaluate(model, eval_loader(args, model), args.ks, args.radii, args.mode, index=index,
                               backend=args.backend, device=device, show_progress=show_progress(args),
                               allow_disjoint=args.allow_disjoint, with_ranking=True)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if is_main_rank():
        metrics, ranking = metrics
        if args.html:
            _add_chance(metrics, ranking)
        paths = write_report(args.out, metrics)
        if args.html:
            paths["html"] = _write_html(args, model, metrics, ranking)
        print(markdown_table(metrics), end="")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_chance(metrics: dict, ranking, max_pairs: int = 50_000_000) -> None:
    """Chance level beside the accuracy (as the trainer's report has it), when the
    query x database distance matrix it needs is affordable."""
    from text4vpr.retrieval.chance import chance_accuracy

    q, n = ranking.query_coords.shape[0], ranking.db_coords.shape[0]
    if q * n > max_pairs:
        print(f"chance level left out: {q} x {n} distances exceed {max_pairs}")
        return
    metrics["chance"] = chance_accuracy(ranking.query_coords, ranking.db_coords, tuple(metrics["ks"]),
                                        tuple(metrics["radii"]))


def _write_html(args: argparse.Namespace, model, metrics: dict, ranking):
    import dataclasses
    from pathlib import Path

    from text4vpr.retrieval.html_report import run_identity, write_html_report

    config = {"model": dataclasses.asdict(model.config), "eval": {k: v for k, v in vars(args).items() if k != "func"}}
    identity = run_identity(args.model, args.shards, args.mode, config, index=args.index or "(images encoded)")
    shard_dirs = [args.shards, *_index_shards(args.index)]
    return write_html_report(Path(args.out) / "report.html", metrics, ranking, shard_dirs, identity,
                             failures=args.gallery, successes=max(1, args.gallery // 4))


def _index_shards(path: str | None) -> list[str]:
    """The shard folder an index was built from, when its header records one (thumbnails)."""
    from text4vpr.retrieval.index import read_header

    shards = read_header(path).get("shards") if path else None
    return [shards] if shards else []
