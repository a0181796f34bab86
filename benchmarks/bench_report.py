#!/usr/bin/env python
"""Report cost against the evaluation it reports: a synthetic split of N locations (test split
only, cached, as bench_eval.py), a tiny random-init model (the cheapest evaluation, so the
harshest ratio; random weights also fill the gallery with misses), `evaluate`
timed warm, then each piece of what `text4vpr eval --html` writes, timed (median of --repeats):
report.md + metrics.json + accuracy_vs_radius.png, the chance level, and report.html (one pass
over the shards for the gallery's thumbnails, SVG charts, the page). Wall seconds and CPU
seconds of this process (the loader runs in-process, --workers 0, so the CPU time is all of
the work and barely moves with the machine's load). Prints a table, writes JSON.

    python benchmarks/bench_report.py                      # 1,000 locations, 64 px JPEGs, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from benchmarks.bench_eval import KS, RADII, prepare  # noqa: E402
from benchmarks.common import machine, print_table  # noqa: E402
from text4vpr.data.loader import LoaderConfig, build_loader  # noqa: E402
from text4vpr.data.tokenizer import load_tokenizer  # noqa: E402
from text4vpr.models import Text4VPR, tiny_config  # noqa: E402
from text4vpr.retrieval.chance import chance_accuracy  # noqa: E402
from text4vpr.retrieval.defaults import GALLERY, gallery_successes  # noqa: E402
from text4vpr.retrieval.evaluate import evaluate  # noqa: E402
from text4vpr.retrieval.html_report import run_identity, write_html_report  # noqa: E402
from text4vpr.retrieval.report import write_report  # noqa: E402
from text4vpr.utils.atomic import atomic_write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--locations", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="synthetic JPEG side (px); the model sees 56")
    p.add_argument("--gallery", type=int, default=GALLERY, help="worst queries in the gallery (+ a quarter as many hits)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="data generation workers")
    p.add_argument("--cache", default=".cache/bench_report", help="synthetic data cache")
    p.add_argument("--out", default="benchmarks/results/bench_report_cpu.json")
    return p.parse_args(argv)


def median_time(fn, repeats: int) -> tuple[object, float, float]:
    """(result, median wall s, median CPU s of this process) over `repeats` calls."""
    runs = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return out, statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.cache) / f"n{args.locations}-px{args.image_size}"
    _, shards, tok = prepare(root, args.locations, args.image_size, args.workers)
    torch.manual_seed(0)
    model = Text4VPR(tiny_config(vocab_size=len(load_tokenizer(tok)))).eval()
    cfg = LoaderConfig(shards=str(shards), tokenizer=str(tok), batch_size=32, image_size=56,
                       num_workers=0, max_text_length=96)
    run = lambda: evaluate(model, build_loader(cfg, "eval"), KS, RADII)  # noqa: E731
    run()  # warm-up: allocator, first-call costs
    result, eval_s, eval_cpu = median_time(run, args.repeats)
    metrics, ranking = result.metrics, result.ranking
    identity = run_identity("tiny random init", shards, metrics["mode"], {"bench": vars(args)})
    with tempfile.TemporaryDirectory() as tmp:
        _, files_s, files_cpu = median_time(lambda: write_report(tmp, metrics), args.repeats)
        chance, chance_s, chance_cpu = median_time(
            lambda: chance_accuracy(ranking.query_coords, ranking.db_coords, KS, RADII), args.repeats)
        metrics["chance"] = chance
        html = Path(tmp) / "report.html"
        _, html_s, html_cpu = median_time(lambda: write_html_report(
            html, metrics, ranking, [shards], identity, failures=args.gallery, successes=gallery_successes(args.gallery)),
            args.repeats)
        size_mb = html.stat().st_size / 1e6
        cards = html.read_text().count('<article class="card')
    html_total, html_total_cpu = chance_s + html_s, chance_cpu + html_cpu
    rows = [["evaluate (encode + search + metrics)", eval_s, 100.0, eval_cpu, 100.0, ""],
            ["report.md + metrics.json + PNG", files_s, 100 * files_s / eval_s, files_cpu, 100 * files_cpu / eval_cpu,
             "matplotlib; written before --html too"],
            ["chance level", chance_s, 100 * chance_s / eval_s, chance_cpu, 100 * chance_cpu / eval_cpu,
             f"{args.locations}^2 distances"],
            ["report.html", html_s, 100 * html_s / eval_s, html_cpu, 100 * html_cpu / eval_cpu,
             f"{cards} cards, {size_mb:.2f} MB"],
            ["--html adds (chance + report.html)", html_total, 100 * html_total / eval_s, html_total_cpu,
             100 * html_total_cpu / eval_cpu, "acceptance: < 10 %"]]
    print_table(["step", "wall s", "% of evaluate", "CPU s", "% of evaluate (CPU)", "note"], rows,
                title=f"{args.locations} locations, tiny model, {args.image_size} px JPEGs, CPU x{torch.get_num_threads()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"locations": args.locations, "image_size": args.image_size, "cards": cards,
                            "html_mb": size_mb, "wall_s": {"eval": eval_s, "report_files": files_s, "chance": chance_s,
                                                           "html": html_s},
                            "cpu_s": {"eval": eval_cpu, "report_files": files_cpu, "chance": chance_cpu,
                                      "html": html_cpu},
                            "html_fraction_of_eval": {"wall": html_total / eval_s, "cpu": html_total_cpu / eval_cpu},
                            "machine": machine(), "command": " ".join(sys.argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
