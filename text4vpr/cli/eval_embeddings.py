"""`text4vpr eval-embeddings --queries Q.safetensors --database DB --out DIR`: the metrics of
precomputed vectors; each file holds `embeddings` (n, V, D), `view_mask` (n, V), `coords` (n, 3)
and `index` (n,), and a database may be an index folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from text4vpr.cli._retrieval_common import add_chance, add_index_risk_args, add_mode_arg, check_device
from text4vpr.cli.arg_types import out_folder
from text4vpr.cli.errors import UsageError
from text4vpr.cli.evaluate import add_ks_radii

_NAMES = ("embeddings", "view_mask", "coords", "index")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, help="query vectors (.safetensors)")
    parser.add_argument("--database", required=True, help="database vectors (.safetensors or an index folder)")
    add_mode_arg(parser)
    add_ks_radii(parser)
    parser.add_argument("--allow-disjoint", action="store_true",
                        help="score queries whose locations are not in the database (by default an error)")
    add_index_risk_args(parser)
    parser.add_argument("--device", default="cpu", help="device for the search (cpu, cuda)")
    parser.add_argument("--out", required=True, type=out_folder, help="report folder")


def _load(path: str, role: str) -> tuple[dict, dict]:
    """(tensors, provenance): the digests the file or index recorded ({} for a plain file);
    `role` "--queries" or "--database": a file written for the other role is refused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from text4vpr.retrieval.index import FORMAT as INDEX_FORMAT, load_index
    from text4vpr.retrieval.queries import QUERIES_FORMAT

    p = Path(path)
    if p.is_dir():
        idx = load_index(p)
        tensors = {"embeddings": idx.embeddings, "view_mask": idx.view_mask, "coords": idx.coords, "index": idx.index}
        return tensors, idx.header
    if not p.is_file():
        raise UsageError(f"{p}: no such file or index folder")
    try:
        tensors = load_file(str(p))
    except SafetensorError as e:
        raise UsageError(f"{p}: not a safetensors file ({e}); pass one written by `text4vpr index queries`") from None
    missing = [n for n in _NAMES if n not in tensors]
    if missing:
        raise UsageError(f"{p}: missing tensor(s) {', '.join(missing)} (needs {', '.join(_NAMES)})")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if role == "--database" and meta.get("format") == QUERIES_FORMAT:
        raise UsageError(f"--database {p}: a query file (written by `text4vpr index queries`), not database vectors; "
                         "pass the index folder of `text4vpr index build`")
    if role == "--queries" and meta.get("format") == INDEX_FORMAT:
        raise UsageError(f"--queries {p}: an index part (database image vectors), not query vectors; "
                         "pass the file of `text4vpr index queries`")
    return tensors, meta


def _check_same_model(queries: dict, database: dict, where: str, allow: bool) -> None:
    """Both sides written by text4vpr from one model: their weights digests must agree."""
    from text4vpr.retrieval.provenance import check_digests

    if queries.get("weights_digest") and database.get("weights_digest"):
        check_digests(database, {"weights_digest": queries["weights_digest"]}, where, allow)


def run(args: argparse.Namespace) -> int:
    from text4vpr.retrieval.evaluate import check_queries_in_database, search_metrics
    from text4vpr.retrieval.report import markdown_table, write_report

    check_device(args.device)
    (q, q_meta), (db, db_meta) = _load(args.queries, "--queries"), _load(args.database, "--database")
    _check_same_model(q_meta, db_meta, f"{args.database} (with {args.queries})", args.allow_index_mismatch)
    if not args.allow_disjoint:
        check_queries_in_database(q["index"].long(), db["index"].long())
    result = search_metrics(
        q["embeddings"], q["view_mask"].bool(), q["coords"].double(), db["embeddings"], db["view_mask"].bool(),
        db["coords"].double(), args.ks, args.radii, args.mode, backend=args.backend, device=args.device,
        ids=(q["index"].long(), db["index"].long()),
    )
    metrics = result.metrics
    add_chance(metrics, result.ranking.query_coords, result.ranking.db_coords)  # as `text4vpr eval` has it
    paths = write_report(args.out, metrics)
    print(markdown_table(metrics), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
