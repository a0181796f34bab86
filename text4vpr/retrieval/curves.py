"""Training curves for the HTML report, as inline SVG: the loss and the validation accuracy
against the step, from a run's `metrics.jsonl` events."""

from __future__ import annotations

from text4vpr.retrieval import svg
from text4vpr.retrieval.metrics import key


def loss_chart(events: list[dict]) -> str:
    """Training loss against the step ('' when the log holds none)."""
    pts = [(float(e["step"]), float(e["loss"])) for e in events if e.get("kind") == "train" and "loss" in e]
    return svg.line_chart({"train loss": pts}, "step", "InfoNCE loss", y_range=None, cls="loss") if pts else ""


def validation_chart(events: list[dict], r: float = 5.0) -> str:
    """Validation accuracy within r metres against the step, one line per k ('' without validations)."""
    evals = [e for e in events if e.get("kind") == "val" and "accuracy" in e]
    if not evals:
        return ""
    series = {f"top-{k} within {r:g} m": [(float(e["step"]), 100 * e["accuracy"][k][key(r)]) for e in evals
                                          if key(r) in e["accuracy"].get(k, {})] for k in evals[0]["accuracy"]}
    return svg.line_chart(series, "step", "validation accuracy (%)", cls="val-accuracy")


def training_section(events: list[dict]) -> str:
    """The report's 'Training' section ('' when the events hold no curve)."""
    charts = loss_chart(events) + validation_chart(events)
    return f'<section id="training"><h2>Training</h2><div class="charts">{charts}</div></section>' if charts else ""
