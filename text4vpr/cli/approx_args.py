"""`index build --approximate` options: the FAISS index beside the exact parts (docs/retrieval.md#approximate-index)."""

from __future__ import annotations

import argparse


def add_approximate_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("approximate index (FAISS candidates + exact re-rank; pip install 'text4vpr[approx]')")
    g.add_argument("--approximate", action="store_true", help="also build the approximate index (one FAISS file per part)")
    g.add_argument("--target-recall", type=float, default=None,
                   help="tune the probe count on held-out queries until this recall of the exact top-10 (e.g. 0.99)")
    g.add_argument("--tune-queries", type=int, default=256, help="held-out locations whose descriptions tune it")
    g.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw", help="graph (HNSW, sq8 codes) or inverted lists")
    g.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (8*M bytes per location)")
    g.add_argument("--ef-construction", type=int, default=128, help="HNSW candidates kept while inserting")
    g.add_argument("--codes", choices=("sq8", "pq"), default="sq8", help="compressed codes: 8-bit scalar or PQ (ivf)")
    g.add_argument("--coarse-dim", type=int, default=256, help="projection of the V*D concatenation")
    g.add_argument("--nlist", type=int, default=0, help="ivf: inverted lists per part (0: the rule)")
    g.add_argument("--nprobe", type=int, default=0,
                   help="search breadth without tuning: ivf lists probed, hnsw efSearch (0: the rule)")
    g.add_argument("--pq-m", type=int, default=0, help="PQ bytes per location (0: the rule, coarse-dim / 8)")
    g.add_argument("--opq", action="store_true", help="learn an OPQ rotation before PQ")
    g.add_argument("--rerank", type=int, default=32, help="candidates per query (and rotation) re-ranked exactly")


def approx_config(args: argparse.Namespace):
    """The ApproxConfig the flags describe (UsageError on impossible values)."""
    from text4vpr.cli.errors import UsageError
    from text4vpr.retrieval.approx_index import ApproxConfig

    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("--approximate needs FAISS: pip install 'text4vpr[approx]' (faiss-cpu)") from None
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.kind == "hnsw" and args.codes != "sq8":
        raise UsageError("--kind hnsw stores sq8 codes; --codes pq needs --kind ivf")
    for flag, least in (("tune_queries", 1), ("coarse_dim", 1), ("rerank", 1), ("hnsw_m", 1), ("ef_construction", 1),
                        ("nlist", 0), ("nprobe", 0), ("pq_m", 0)):  # 0: the documented rule
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if args.pq_m and args.coarse_dim % args.pq_m:
        raise UsageError(f"--pq-m {args.pq_m} must divide --coarse-dim {args.coarse_dim}")
    return ApproxConfig(kind=args.kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                        coarse_dim=args.coarse_dim, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                        codes=args.codes, opq=args.opq, rerank=args.rerank)


def build_approximate_from_args(args: argparse.Namespace, model, loader, device) -> dict:
    """Build the FAISS files of the index just written; tune on the first --tune-queries
    locations' descriptions (rank 0) when --target-recall is given. Returns the header."""
    import itertools
    import math

    from text4vpr.retrieval.approx_build import build_approximate
    from text4vpr.retrieval.evaluate import encode_split
    from text4vpr.utils.distributed import distributed_world

    cfg = approx_config(args)
    queries = mask = None
    if args.target_recall is not None:  # every rank encodes (encode_split ends in a collective); rank 0's tune
        batches = itertools.islice(loader, math.ceil(args.tune_queries / args.batch_size))
        texts = encode_split(model, batches, device, images=False)
        if distributed_world()[0] == 0:
            queries, mask = texts["queries"][: args.tune_queries], texts["query_mask"][: args.tune_queries]
    return build_approximate(args.out, cfg, tune_queries=queries, tune_mask=mask, target_recall=args.target_recall)


def approximate_summary(header: dict) -> str:
    sec = header.get("approximate")
    if not isinstance(sec, dict):
        return ""
    tuning = sec.get("tuning") or {}
    recall = ", ".join(f"{m} {r:.4f}" for m, r in (tuning.get("recall") or {}).items())
    breadth = "efSearch" if str(sec["kind"]).startswith("hnsw") else "nprobe"
    partial = sec.get("nprobe_partial", sec["nprobe"])
    return (f"; approximate {sec['kind']}: {breadth} {sec['nprobe']} (partial-view queries {partial}), re-rank {sec['rerank']}"
            + (f", recall@{tuning['k']} {recall} on {tuning['queries']} held-out queries" if recall else ""))
