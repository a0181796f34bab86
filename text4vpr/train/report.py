"""End-of-run report: markdown with the final table beside chance, loss and accuracy plots."""

from __future__ import annotations

import os
from pathlib import Path

from text4vpr.retrieval.report import markdown_table
from text4vpr.utils.atomic import atomic_open, atomic_write_text


def _save_fig(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, bbox_inches="tight", format="png")


def plot_loss(events: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in events if e["kind"] == "train"]
    loss = [e["loss"] for e in events if e["kind"] == "train"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss (sum of both directions)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def plot_accuracy(events: list[dict], path: Path, r: str = "5") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [e for e in events if e["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if evals:
        for k in evals[0]["accuracy"]:
            ax.plot([e["step"] for e in evals], [100 * e["accuracy"][k][r] for e in evals], marker="o", label=f"top-{k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(f"accuracy within {r} m (%)")
    ax.set_title("Validation accuracy over training")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def write_report(run_dir: str | os.PathLike, final: dict, events: list[dict], summary: dict) -> Path:
    """`report.md` plus `loss.png` and `accuracy.png` in the run directory."""
    run_dir = Path(run_dir)
    plot_loss(events, run_dir / "loss.png")
    radii = list(next(iter(final["accuracy"].values())))
    r = "5" if "5" in radii else radii[0]
    plot_accuracy(events, run_dir / "accuracy.png", r=r)
    lines = [
        "# Text4VPR training report",
        "",
        *(f"- {k}: {v}" for k, v in summary.items()),
        "",
        f"## Final evaluation ({final.get('split', 'held-out')} split)",
        "",
        markdown_table(final),
        "",
        "![loss](loss.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
