"""Experiment trackers through Accelerate (`train.log_with`: tensorboard, wandb, mlflow, ...).

`metrics.jsonl` stays the always-on record; every numeric value of every logged event is
mirrored to the trackers as `{kind}/{key}` (nested keys joined by `/`) at the event's step.
Local files of all trackers go under `<run>/trackers/`: TensorBoard in `trackers/text4vpr`,
MLflow in the file store `trackers/mlruns` unless MLFLOW_TRACKING_URI names another, W&B in
`trackers/wandb` (offline with WANDB_MODE=offline). Optional packages: `pip install "text4vpr[trackers]"`.
"""

from __future__ import annotations

import os
from pathlib import Path

from text4vpr.config import ConfigError
from text4vpr.utils.mapping import flatten

PROJECT = "text4vpr"  # W&B project, MLflow experiment, TensorBoard sub-folder
TRACKERS_DIR = "trackers"


def tracker_names(log_with: list[str], tensorboard: bool) -> list[str]:
    """The trackers a run uses: `log_with` plus tensorboard when `train.tensorboard`; an
    unknown name or an uninstalled package is a config error (Accelerate would drop it silently)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = list(dict.fromkeys([*log_with, *(["tensorboard"] if tensorboard else [])]))
    known = [t.value for t in LoggerType if t.value != "all"]
    available = {str(t.value if hasattr(t, "value") else t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"train.log_with: unknown tracker {name!r} (known: {', '.join(known)})")
        if name not in available:
            raise ConfigError(f"train.log_with: {name} is not installed; pip install \"text4vpr[trackers]\" "
                              f"(or the {name} package)")
    return names


def init_kwargs(names: list[str], run_dir: Path) -> dict:
    """Per-tracker arguments keeping every tracker's files in the run directory."""
    out: dict = {}
    base = run_dir / TRACKERS_DIR
    if "mlflow" in names:
        out["mlflow"] = {"run_name": run_dir.name}
        if "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store needs no server
            mlflow.set_tracking_uri((base / "mlruns").resolve().as_uri())
    if "wandb" in names:
        (base / "wandb").mkdir(parents=True, exist_ok=True)
        out["wandb"] = {"dir": str(base / "wandb"), "name": run_dir.name}
    return out


def start_trackers(acc, names: list[str], run_dir: Path, config: dict) -> None:
    """`Accelerator.init_trackers` with the flattened config as hyper-parameters (main process)."""
    if not names:
        return
    (run_dir / TRACKERS_DIR).mkdir(parents=True, exist_ok=True)
    params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config, "/").items()}
    acc.init_trackers(PROJECT, config=params, init_kwargs=init_kwargs(names, run_dir))


def scalars(kind: str, values: dict) -> dict[str, float]:
    """The numeric values of one event, as tracker keys `{kind}/{key}` (booleans left out)."""
    return {f"{kind}/{k}": v for k, v in flatten(values, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
