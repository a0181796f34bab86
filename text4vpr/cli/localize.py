"""`text4vpr localize --model DIR --index INDEX --text "..." (up to 4, in pos order)`: the best
matching locations as a table, JSON or an HTML page (`--mode any-heading` when the first
description's heading is unknown)."""

from __future__ import annotations

import argparse
import json
import sys

from text4vpr.cli._retrieval_common import add_exact_arg, add_index_risk_args, add_mode_arg, add_text_normalization_arg, check_device
from text4vpr.cli.arg_types import positive_int
from text4vpr.cli.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--index", required=True, help="index folder built by `text4vpr index build` with this model")
    add_index_risk_args(parser)
    add_exact_arg(parser)
    parser.add_argument("--text", action="append", default=[], help="a description (repeat up to 4 times, pos order)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="number of locations to list")
    add_mode_arg(parser)
    add_text_normalization_arg(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--html", default=None, help="also write this HTML page (thumbnails, distances between results)")
    parser.add_argument("--shards", action="append", default=[], help="shard folder(s) of the index's locations, "
                        "for the page's thumbnails (repeatable)")


def _print_table(results: list[dict]) -> None:
    print(f"{'rank':>4} {'score':>10} {'index':>7} {'latitude':>12} {'longitude':>12} {'height':>8}  ECEF x, y, z (m)")
    for r in results:
        x, y, z = r["ecef"]
        print(f"{r['rank']:>4} {r['score']:>10.4f} {r['index']:>7} {r['lat']:>12.7f} {r['lon']:>12.7f} "
              f"{r['height']:>8.2f}  {x:.2f}, {y:.2f}, {z:.2f}")


def run(args: argparse.Namespace) -> int:
    from text4vpr.data.tokenizer import check_text_normalization, load_tokenizer
    from text4vpr.models import Text4VPR
    from text4vpr.retrieval.approx_load import load_search_index
    from text4vpr.retrieval.provenance import check_digests, weights_digest
    from text4vpr.retrieval.localize import MAX_DESCRIPTIONS, encode_descriptions, rank_locations

    if not args.text:
        raise UsageError('no description given: pass --text "..." (up to 4 times)')
    if len(args.text) > MAX_DESCRIPTIONS:
        raise UsageError(f"{len(args.text)} descriptions given; at most {MAX_DESCRIPTIONS} (one per view)")
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    check_text_normalization(args.text_normalization, "--text-normalization")  # before loading the model
    check_device(args.device)
    model = Text4VPR.from_pretrained(args.model, map_location=args.device).eval()
    index = load_search_index(args.index, model.config_hash(), model.embed_dim, exact=args.exact)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    query, mask = encode_descriptions(model, tokenizer, args.text, views=index.header["views"],
                                      text_normalization=args.text_normalization)
    # after encoding: a model with non-finite weights is named as such, not as "another model"
    check_digests(index.header, {"weights_digest": weights_digest(model)}, args.index, args.allow_index_mismatch)
    results = rank_locations(query, mask, index, args.top_k, args.mode)
    if args.json:
        print(json.dumps({"mode": args.mode, "descriptions": args.text, "results": results}, indent=2))
    else:
        _print_table(results)
    if args.html:
        from text4vpr.retrieval.html_localize import write_localize_html
        from text4vpr.retrieval.html_report import run_identity

        identity = run_identity(args.model, ", ".join(args.shards) or "(none: no thumbnails)", args.mode, index=args.index)
        write_localize_html(args.html, args.text, results, args.shards, identity)
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0
