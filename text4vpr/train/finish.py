"""End of a run: evaluate the best model on the held-out split, chance level, report files."""

from __future__ import annotations

from pathlib import Path

from text4vpr.models import Text4VPR
from text4vpr.retrieval.chance import chance_accuracy
from text4vpr.train.data import read_coords
from text4vpr.train.logs import read_metrics
from text4vpr.retrieval.report import markdown_table
from text4vpr.train.report import write_html, write_run_report


def _load_best(trainer) -> str:
    """Load best_model weights into the live model when validation chose one; say which."""
    best = trainer.run_dir / "best_model"
    if not (best / "model.safetensors").exists():
        return f"final (step {trainer.state.step})"
    model = trainer.acc.unwrap_model(trainer.model)
    model.load_state_dict(Text4VPR.from_pretrained(best).state_dict(), strict=True)  # tied weights restored
    return f"best by validation top-1 within 5 m (step {trainer.state.best_step})"


def finish_run(trainer) -> dict:
    cfg = trainer.cfg
    if not cfg.eval.final:
        return {}
    which = _load_best(trainer)
    split = "test" if cfg.data.test_shards or trainer.paths.test != trainer.paths.val else "val"
    metrics, ranking = trainer._evaluate(trainer.paths.test, with_ranking=True)  # every rank takes part
    metrics["split"] = split
    metrics["model"] = which
    if not trainer.acc.is_main_process:
        return metrics
    coords = read_coords(trainer.paths.test)
    metrics["chance"] = chance_accuracy(coords, coords, tuple(cfg.eval.ks), tuple(cfg.eval.radii))
    run_dir: Path = trainer.run_dir
    summary = {
        "steps": trainer.state.step,
        "epochs": trainer.state.epoch,
        "processes": trainer.acc.num_processes,
        "model evaluated": which,
        "non-finite steps skipped": trainer.state.nonfinite_total,
    }
    if trainer.acc.scaler is not None:  # fp16
        summary["fp16 loss-scale back-offs (steps skipped by design)"] = trainer.state.loss_scale_backoffs
    write_run_report(run_dir, metrics, read_metrics(run_dir / "metrics.jsonl"), summary)
    if cfg.eval.html:
        write_html(run_dir, metrics, ranking, trainer.paths.test, cfg)
    print(f"\nHeld-out {split} split, {metrics['num_queries']} queries, model: {which}")
    print(markdown_table(metrics), end="")
    print(f"\nrun directory: {run_dir} (report.md, report.html, final_metrics.json, plots, model/)")
    return metrics
