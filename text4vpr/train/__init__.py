"""The training application (`accelerate launch train.py`, `text4vpr train`).

Sits on top of the library (data, models, losses, retrieval); the library never imports it.
"""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "demo"  # text4vpr/configs/demo.yaml, shipped in the package (configs/demo.yaml in a checkout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="run config YAML, or a packaged config's name (demo | street360loc | tiny_test); "
                             "default: demo")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, as YAML) and exit without training")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def resolve_config(config: str | None, overrides: list[str], resume: str | None = None):
    """Load the run config: file (or the embedded demo default) + overrides (+ --resume)."""
    from text4vpr.config import find_config, load_config
    from text4vpr.train.config import RunConfig

    path = find_config(config or DEFAULT_CONFIG)
    extra = [f"train.resume={resume}"] if resume else []
    return load_config(RunConfig, path, list(overrides) + extra)


def print_config(config: str | None, overrides: list[str], resume: str | None = None) -> int:
    """The resolved run config, every key, as YAML a `--config` file accepts."""
    from text4vpr.config import dump_yaml

    print(dump_yaml(resolve_config(config, list(overrides), resume)), end="")
    return 0


def run(config: str | None = None, overrides: list[str] = (), resume: str | None = None) -> dict:
    cfg = resolve_config(config, list(overrides), resume)  # config errors before heavy imports
    from text4vpr.train.trainer import Trainer

    _print_threads()
    return Trainer(cfg).train()


def _print_threads() -> None:
    """CPU threads per process change both speed and the float summation order (the result):
    say how many this run has (`accelerate launch` sets OMP_NUM_THREADS=1 when it is unset)."""
    import os

    import torch

    if os.environ.get("RANK", "0") == "0":
        print(f"CPU threads per process: {torch.get_num_threads()} "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def _quiet_cpu_only_warnings() -> None:
    """DeepSpeed, imported by Accelerate, warns on every CPU-only start; name the CPU instead."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    from text4vpr.cli.errors import add_debug_flag, run_guarded
    from text4vpr.cli.help import finish_help
    from text4vpr.utils.launch_check import check_world_size

    _quiet_cpu_only_warnings()
    parser = argparse.ArgumentParser(prog="train.py", description="Train Text4VPR (launch with `accelerate launch`).")
    add_arguments(parser)
    add_debug_flag(parser)
    finish_help(parser)
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"not a dotted override (key.sub=value): {' '.join(bad)}")

    def train() -> int:
        if args.print_config:
            return print_config(args.config, args.overrides, args.resume)
        check_world_size()
        run(args.config, args.overrides, args.resume)
        return 0

    rc = run_guarded(train, args.debug)
    from text4vpr.utils.distributed import leave

    return leave(rc)  # ranks leave together (rank 0 wrote the report last)
