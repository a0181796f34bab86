#!/usr/bin/env python
"""Report cost against the evaluation it reports: a synthetic split of N locations (test split
only, cached, as bench_eval.py), a tiny random-init model (the cheapest evaluation, so the
harshest ratio; random weights also fill the gallery with misses), `evaluate(with_ranking=True)`
timed warm, then each piece of what `text4vpr eval --html` writes, timed (median of --repeats):
report.md + metrics.json + accuracy_vs_radius.png, the chance level, and report.html (one pass
over the shards for the gallery's thumbnails, SVG charts, the page). Prints a table, writes JSON.

    python benchmarks/bench_report.py                      # 1,000 locations, 64 px JPEGs, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.bench_eval import KS, RADII, prepare  # noqa: E402
from benchmarks.common import machine, print_table, timed  # noqa: E402
from text4vpr.data.loader import LoaderConfig, build_loader  # noqa: E402
from text4vpr.data.tokenizer import load_tokenizer  # noqa: E402
from text4vpr.models import Text4VPR, tiny_config  # noqa: E402
from text4vpr.retrieval.chance import chance_accuracy  # noqa: E402
from text4vpr.retrieval.evaluate import evaluate  # noqa: E402
from text4vpr.retrieval.html_report import run_identity, write_html_report  # noqa: E402
from text4vpr.retrieval.report import write_report  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--locations", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="synthetic JPEG side (px); the model sees 56")
    p.add_argument("--gallery", type=int, default=40, help="worst queries in the gallery (+ a quarter as many hits)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="data generation and loader workers")
    p.add_argument("--cache", default=".cache/bench_report", help="synthetic data cache")
    p.add_argument("--out", default="benchmarks/results/bench_report_cpu.json")
    return p.parse_args(argv)


def median_time(fn, repeats: int, device) -> tuple[object, float]:
    runs = [timed(fn, device) for _ in range(repeats)]
    return runs[-1][0], statistics.median(s for _, s in runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    root = Path(args.cache) / f"n{args.locations}-px{args.image_size}"
    _, shards, tok = prepare(root, args.locations, args.image_size, args.workers)
    torch.manual_seed(0)
    model = Text4VPR(tiny_config(vocab_size=len(load_tokenizer(tok)))).eval()
    cfg = LoaderConfig(shards=str(shards), tokenizer=str(tok), batch_size=32, image_size=56,
                       num_workers=args.workers, max_text_length=96)
    run = lambda: evaluate(model, build_loader(cfg, "eval"), KS, RADII, with_ranking=True)  # noqa: E731
    timed(run, device)  # warm-up: worker start, allocator, first-call costs
    (metrics, ranking), eval_s = median_time(run, args.repeats, device)
    identity = run_identity("tiny random init", shards, metrics["mode"], {"bench": vars(args)})
    with tempfile.TemporaryDirectory() as tmp:
        _, files_s = median_time(lambda: write_report(tmp, metrics), args.repeats, device)
        chance, chance_s = median_time(lambda: chance_accuracy(ranking.query_coords, ranking.db_coords, KS, RADII),
                                       args.repeats, device)
        metrics["chance"] = chance
        html = Path(tmp) / "report.html"
        _, html_s = median_time(lambda: write_html_report(html, metrics, ranking, [shards], identity,
                                                          failures=args.gallery, successes=max(1, args.gallery // 4)),
                                args.repeats, device)
        size_mb = html.stat().st_size / 1e6
        cards = html.read_text().count('<article class="card')
    total = files_s + chance_s + html_s
    rows = [["evaluate (encode + search + metrics)", eval_s, 100.0, ""],
            ["report.md + metrics.json + PNG", files_s, 100 * files_s / eval_s, "matplotlib"],
            ["chance level", chance_s, 100 * chance_s / eval_s, f"{args.locations}^2 distances"],
            ["report.html", html_s, 100 * html_s / eval_s, f"{cards} cards, {size_mb:.2f} MB"],
            ["all report files", total, 100 * total / eval_s, "acceptance: < 10 %"]]
    print_table(["step", "s", "% of evaluate", "note"], rows,
                title=f"{args.locations} locations, tiny model, {args.image_size} px JPEGs, CPU x{torch.get_num_threads()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"locations": args.locations, "image_size": args.image_size, "eval_s": eval_s,
                            "report_files_s": files_s, "chance_s": chance_s, "html_s": html_s, "html_mb": size_mb,
                            "cards": cards, "report_fraction_of_eval": total / eval_s, "machine": machine(),
                            "command": " ".join(sys.argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
