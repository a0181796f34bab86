"""The training application on top of the library: `resolve_config` builds a run config and
`run(cfg)` trains it; the command line (`text4vpr train`, `train.py`) is `text4vpr.cli.train`."""

from __future__ import annotations

DEFAULT_CONFIG = "demo"  # text4vpr/configs/demo.yaml, shipped in the package


def resolve_config(config: str | None, overrides: list[str], resume: str | None = None):
    """The run config: file (default: the packaged demo) + dotted overrides (+ a resume path)."""
    from text4vpr.config import find_config, load_config
    from text4vpr.train.config import RunConfig

    path = find_config(config or DEFAULT_CONFIG)
    extra = [f"train.resume={resume}"] if resume else []
    return load_config(RunConfig, path, list(overrides) + extra)


def run(cfg) -> dict:
    """Train the resolved run config `cfg`; returns the final metrics."""
    from text4vpr.train.trainer import Trainer

    _print_threads()
    return Trainer(cfg).train()


def _print_threads() -> None:
    """Say how many CPU threads each process has: they change the float summation order, so the result."""
    import os

    import torch

    if os.environ.get("RANK", "0") == "0":
        print(f"CPU threads per process: {torch.get_num_threads()} "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
