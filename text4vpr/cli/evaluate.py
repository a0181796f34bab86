"""`text4vpr eval --model DIR --shards DIR [--index INDEX] --out DIR`: top-k accuracy within r
metres on a split (metrics.json, report.md, a plot; `--html` report.html), single-process or
under `accelerate launch` (docs/retrieval.md)."""

from __future__ import annotations

import argparse

from text4vpr.cli._retrieval_common import (
    add_chance, add_exact_arg, add_index_risk_args, add_mode_arg, add_model_loader_args, check_loader_args, eval_loader, init_distributed, is_main_rank, load_model_on,
    precision_context, show_progress,
)
from text4vpr.cli.arg_types import non_negative_int, out_folder, positive_float, positive_int
from text4vpr.cli.errors import UsageError
from text4vpr.retrieval.defaults import GALLERY, KS, RADII, gallery_successes


def add_ks_radii(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ks", type=positive_int, nargs="+", default=list(KS), help="k values")
    parser.add_argument("--radii", type=positive_float, nargs="+", default=list(RADII), help="radii in metres")
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
    parser.add_argument("--out", required=True, type=out_folder, help="report folder")
    parser.add_argument("--html", action="store_true", help="also write report.html: map, charts, failure gallery")
    parser.add_argument("--gallery", type=non_negative_int, default=GALLERY,
                        help=f"worst queries shown in report.html (default {GALLERY})")


def _this_rank_rows(path: str) -> tuple[int, int]:
    """The index rows this rank searches: each rank reads only those embeddings."""
    from text4vpr.retrieval.index import rank_rows, read_header
    from text4vpr.utils.distributed import distributed_world

    rank, world = distributed_world()
    return rank_rows(int(read_header(path)["count"]), rank, world)


def run(args: argparse.Namespace) -> int:
    from text4vpr.retrieval.evaluate import evaluate
    from text4vpr.retrieval.approx_load import load_search_index
    from text4vpr.retrieval.provenance import evaluation_identity

    if args.gallery < 0:
        raise UsageError(f"--gallery must be >= 0 (worst queries shown in report.html), got {args.gallery}")
    check_loader_args(args)  # before any model is loaded
    device = init_distributed()
    model = load_model_on(args.model, device)
    identity = evaluation_identity(model, args.model, args.shards, args.index)
    index = None
    if args.index:
        index = load_search_index(args.index, model.config_hash(), model.embed_dim, exact=args.exact,
                                  rows=_this_rank_rows(args.index), weights_digest=identity["weights_digest"],
                                  shards_digest=identity["shards_digest"] or None,
                                  allow_mismatch=args.allow_index_mismatch)
    with precision_context(args.precision, device):
        result = evaluate(model, eval_loader(args, model), args.ks, args.radii, args.mode, index=index,
                          backend=args.backend, device=device, show_progress=show_progress(args),
                          allow_disjoint=args.allow_disjoint)
    if is_main_rank():
        result.metrics["identity"] = identity
        _write_outputs(args, model, result)
    return 0


def _write_outputs(args: argparse.Namespace, model, result) -> None:
    """metrics.json (with chance and identity), per_query.jsonl, report.md and its plot, report.html."""
    from pathlib import Path

    from text4vpr.retrieval.per_query import PER_QUERY_JSONL, write_per_query
    from text4vpr.retrieval.report import markdown_table, write_report
    from text4vpr.retrieval.thumbnails import shard_flags

    metrics, ranking = result.metrics, result.ranking
    add_chance(metrics, ranking.query_coords, ranking.db_coords)
    paths = write_report(args.out, metrics)
    shard_dirs = [args.shards, *_index_shards(args.index)]
    paths["per_query"] = write_per_query(Path(args.out) / PER_QUERY_JSONL, ranking, shard_flags(shard_dirs))
    if args.html:
        paths["html"] = _write_html(args, model, metrics, ranking, shard_dirs)
    print(markdown_table(metrics), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _write_html(args: argparse.Namespace, model, metrics: dict, ranking, shard_dirs: list):
    import dataclasses
    from pathlib import Path

    from text4vpr.retrieval.html_report import run_identity, write_html_report

    config = {"model": dataclasses.asdict(model.config), "eval": {k: v for k, v in vars(args).items() if k != "func"}}
    digests = {k: v for k, v in metrics["identity"].items() if k.endswith("_digest")}
    identity = run_identity(args.model, args.shards, args.mode, config, index=args.index or "(images encoded)", **digests)
    return write_html_report(Path(args.out) / "report.html", metrics, ranking, shard_dirs, identity,
                             failures=args.gallery, successes=gallery_successes(args.gallery))


def _index_shards(path: str | None) -> list[str]:
    """The shard folder an index was built from, when its header records one (thumbnails)."""
    from text4vpr.retrieval.index import read_header

    shards = read_header(path).get("shards") if path else None
    return [shards] if shards else []
