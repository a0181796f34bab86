"""End of a run: evaluate the best model on the held-out split, chance level, report files.

The trainer hands over plain values (`FinalRun`), the unwrapped model and its evaluation
call; nothing here reads the trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from text4vpr.models import Text4VPR
from text4vpr.retrieval.chance import chance_accuracy
from text4vpr.retrieval.per_query import PER_QUERY_JSONL, write_per_query
from text4vpr.retrieval.provenance import evaluation_identity
from text4vpr.retrieval.ranking import Evaluation
from text4vpr.retrieval.thumbnails import shard_flags
from text4vpr.retrieval.report import markdown_table
from text4vpr.train.data import read_coords
from text4vpr.train.logs import read_metrics
from text4vpr.train.report import write_html, write_run_report


@dataclasses.dataclass
class FinalRun:
    run_dir: Path
    test_shards: str  # the held-out shards
    split: str  # "test", or "val" when no test split exists
    ks: tuple[int, ...]
    radii: tuple[float, ...]
    steps: int
    epochs: int
    best_step: int  # the step of best_model (-1: none chosen)
    processes: int
    nonfinite_skipped: int
    loss_scale_backoffs: int | None  # fp16 only
    is_main: bool  # this process writes the files
    html_gallery: int | None = None  # report.html with this many worst queries; None: no report.html
    config_text: str = ""  # the resolved config (YAML), the HTML report's identity


def load_best(model: Text4VPR, run: FinalRun) -> tuple[str, Path]:
    """Load best_model weights into `model` (unwrapped) when validation chose one; say which, and
    the folder that holds them."""
    best = run.run_dir / "best_model"
    if run.best_step < 0 or not (best / "model.safetensors").exists():  # none chosen by this run
        return f"final (step {run.steps})", run.run_dir / "model"
    model.load_state_dict(Text4VPR.from_pretrained(best).state_dict(), strict=True)  # tied weights restored
    return f"best by validation top-1 within 5 m (step {run.best_step})", best


def finish_run(model: Text4VPR, evaluate: Callable[[str], Evaluation], run: FinalRun) -> dict:
    """Evaluate the best model on `run.test_shards` (every rank: `evaluate(shards)` -> `Evaluation`),
    then, on the main process, add chance level and write final_metrics.json, the report and
    (`run.html_gallery`) report.html."""
    which, folder = load_best(model, run)
    result = evaluate(run.test_shards)
    metrics, ranking = result.metrics, result.ranking
    metrics["split"] = run.split
    metrics["model"] = which
    if not run.is_main:
        return metrics
    coords = read_coords(run.test_shards)
    metrics["chance"] = chance_accuracy(coords, coords, run.ks, run.radii)
    metrics["identity"] = evaluation_identity(model, folder, run.test_shards)
    write_per_query(run.run_dir / PER_QUERY_JSONL, ranking, shard_flags([run.test_shards]))
    summary = {"steps": run.steps, "epochs": run.epochs, "processes": run.processes, "model evaluated": which,
               "non-finite steps skipped": run.nonfinite_skipped}
    if run.loss_scale_backoffs is not None:
        summary["fp16 loss-scale back-offs (steps skipped by design)"] = run.loss_scale_backoffs
    events = read_metrics(run.run_dir / "metrics.jsonl")
    write_run_report(run.run_dir, metrics, events, summary)
    if run.html_gallery is not None:
        write_html(run.run_dir, metrics, ranking, run.test_shards, run.config_text, run.html_gallery, events)
    print(f"\nHeld-out {run.split} split, {metrics['num_queries']} queries, model: {which}")
    print(markdown_table(metrics), end="")
    print(f"\nrun directory: {run.run_dir} (report.md{', report.html' if run.html_gallery is not None else ''}, "
          f"final_metrics.json, per_query.jsonl, plots, model/)")
    return metrics
