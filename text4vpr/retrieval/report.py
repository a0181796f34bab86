"""Evaluation report files: the metrics as JSON, `report.md` (the accuracy table, a summary, figures)
and a PNG of accuracy against radius. One writer for `text4vpr eval` and the trainer's final
evaluation (which adds its training figures); the HTML report is `html_report.py`."""

from __future__ import annotations

from pathlib import Path

from text4vpr.utils.atomic import atomic_open, atomic_write_json, atomic_write_text

METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_radius.png"


def markdown_table(metrics: dict) -> str:
    """One row per k, one column per radius, values in percent (chance beside them when the
    metrics carry a `chance` entry of the same shape)."""
    acc, chance = metrics["accuracy"], metrics.get("chance")
    radii = list(next(iter(acc.values())).keys())
    lines = [
        f"Top-k accuracy within r metres ({metrics['mode']} similarity, {metrics['num_queries']} queries, "
        f"{metrics['num_database']} database locations)",
        "",
        "| k | " + " | ".join(f"{r} m" for r in radii) + " |",
        "|---|" + "---|" * len(radii),
    ]
    for k, row in acc.items():
        cells = [f"{100 * row[r]:.1f} %" + (f" (chance {100 * chance[k][r]:.1f} %)" if chance else "") for r in radii]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(width: float = 5.5, height: float = 3.5):
    """A matplotlib figure and axes on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)


def plot_accuracy(metrics: dict, path: str | Path) -> None:
    """Accuracy (%) against radius (m), one line per k."""
    fig, ax = figure()
    for k, row in metrics["accuracy"].items():
        radii = [float(r) for r in row]
        ax.plot(radii, [100 * v for v in row.values()], marker="o", label=f"top-{k}")
    ax.set_xlabel("radius r (m)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Text4VPR retrieval ({metrics['mode']}, {metrics['num_queries']} queries)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def write_report(out_dir: str | Path, metrics: dict, *, title: str = "Text4VPR evaluation", summary: dict | None = None,
                 figures: tuple[str, ...] = (), metrics_name: str = METRICS_JSON) -> dict[str, Path]:
    """Write the metrics JSON (`metrics_name`), accuracy_vs_radius.png and report.md into `out_dir`:
    a title, `summary` as bullets, the table beside chance, then the plot and `figures` (file
    names in `out_dir`, e.g. the trainer's loss curve)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / metrics_name, "table": out / REPORT_MD, "plot": out / PLOT_PNG}
    atomic_write_json(paths["json"], metrics)
    plot_accuracy(metrics, paths["plot"])
    lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in (summary or {}).items()), "", markdown_table(metrics), ""]
    lines += [f"![{Path(name).stem}]({name})\n" for name in (PLOT_PNG, *figures)]
    atomic_write_text(paths["table"], "\n".join(lines))
    return paths
