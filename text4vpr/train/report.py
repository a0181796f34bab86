"""End-of-run report: the evaluation report (`retrieval.report.write_report`) of the final
evaluation, with the training loss and the validation accuracy over steps as extra figures."""

from __future__ import annotations

import os
from pathlib import Path

from text4vpr.retrieval.report import figure, save_figure, write_report

FINAL_METRICS = "final_metrics.json"


def plot_loss(events: list[dict], path: Path) -> None:
    """Training loss against the step."""
    train = [e for e in events if e["kind"] == "train"]
    fig, ax = figure(6, 3.5)
    ax.plot([e["step"] for e in train], [e["loss"] for e in train], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss (sum of both directions)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_validation(events: list[dict], path: Path, r: str = "5") -> None:
    """Validation accuracy within r metres against the step, one line per k."""
    evals = [e for e in events if e["kind"] == "val"]
    fig, ax = figure(6, 3.5)
    if evals:
        for k in evals[0]["accuracy"]:
            ax.plot([e["step"] for e in evals], [100 * e["accuracy"][k][r] for e in evals], marker="o", label=f"top-{k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(f"accuracy within {r} m (%)")
    ax.set_title("Validation accuracy over training")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_run_report(run_dir: str | os.PathLike, final: dict, events: list[dict], summary: dict) -> Path:
    """final_metrics.json, report.md and its plots (accuracy_vs_radius, loss, val_accuracy) in the run directory."""
    run_dir = Path(run_dir)
    plot_loss(events, run_dir / "loss.png")
    radii = list(next(iter(final["accuracy"].values())))
    plot_validation(events, run_dir / "val_accuracy.png", r="5" if "5" in radii else radii[0])
    title = f"Text4VPR training report: final evaluation ({final.get('split', 'held-out')} split)"
    return write_report(run_dir, final, title=title, summary=summary, figures=("loss.png", "val_accuracy.png"),
                        metrics_name=FINAL_METRICS)["table"]


def write_html(run_dir: str | os.PathLike, final: dict, ranking, shards: str, config_text: str, gallery: int,
               events: list[dict] = ()) -> Path:
    """report.html of the final evaluation (the `gallery` worst queries): the run's resolved
    config (YAML text) and digests as its identity, `events` (metrics.jsonl) as training curves."""
    from text4vpr.retrieval.defaults import gallery_successes
    from text4vpr.retrieval.html_report import run_identity, write_html_report

    digests = {k: v for k, v in final.get("identity", {}).items() if k.endswith("_digest")}
    identity = run_identity(final.get("model", "model"), shards, final["mode"], config_text,
                            split=final.get("split", "held-out"), run=run_dir, **digests)
    return write_html_report(Path(run_dir) / "report.html", final, ranking, [shards], identity,
                             failures=gallery, successes=gallery_successes(gallery), events=events)
