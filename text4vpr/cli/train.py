"""`text4vpr train` and the checkout's `train.py`: one command line that trains a run config."""

from __future__ import annotations

import argparse
import os
import sys

from text4vpr.cli.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="run config YAML, or a packaged config's name (demo | street360loc | tiny_test); "
                             "default: demo")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, as YAML) and exit without training")
    # SUPPRESS: the top-level `text4vpr --debug train` is not reset by this flag's default
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    from text4vpr.train import resolve_config
    from text4vpr.train import run as train

    if args.print_config:
        return print_config(args.config, args.overrides, args.resume)
    cfg = resolve_config(args.config, args.overrides, args.resume)  # config errors before heavy imports
    one_thread_unless_set()
    check_launch_applies(cfg)
    quiet_known_warnings()
    train(cfg)
    return 0


def print_config(config: str | None, overrides: list[str], resume: str | None = None) -> int:
    """The resolved run config, every key, as YAML a `--config` file accepts (`--print-config`,
    `text4vpr config show`)."""
    from text4vpr.config import dump_yaml
    from text4vpr.train import resolve_config

    print(dump_yaml(resolve_config(config, overrides, resume)), end="")
    return 0


def one_thread_unless_set() -> None:
    """One CPU thread per process unless OMP_NUM_THREADS says otherwise, as `accelerate launch`
    sets it: the thread count changes the float summation order, so the trained model."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # already imported (in-process callers): its pool is sized
        sys.modules["torch"].set_num_threads(1)


def check_launch_applies(cfg) -> None:
    """Refuse a launch this machine cannot honour, before anything is written (docs/cli.md)."""
    import torch

    from text4vpr.utils.launch_check import resolve_deepspeed_config

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if cfg.train.cpu:  # Accelerator(cpu=True) leaves DeepSpeed out without a word
            raise UsageError("DeepSpeed launch config with train.cpu=true (the demo's default): Accelerate would "
                             "train without DeepSpeed; give train.cpu=false (DeepSpeed on the GPU, or on the CPU "
                             "where there is none), or launch without the DeepSpeed config")
        resolve_deepspeed_config()
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, imported by Accelerate, warns on every CPU-only start
    procs, cores = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), os.cpu_count() or 1
    if procs > cores and not cfg.train.cpu:
        raise UsageError(f"{procs} processes on {cores} CPU cores and no GPU: launch at most {cores} "
                         f"(--num_processes {cores}), or give train.cpu=true to run them anyway")
    if procs > cores and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"note: {procs} processes share {cores} CPU cores (train.cpu=true): expect each to run slower")


def quiet_known_warnings() -> None:
    """Filter the warnings the package understands (each explained in docs/cli.md)."""
    import warnings

    # 1x1 conv weights get gradients with other strides on their size-1 dims; DDP copies them either way
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    """`train.py ARGS`: the same as `text4vpr train ARGS`."""
    from text4vpr.cli.errors import run_entry
    from text4vpr.cli.help import finish_help

    parser = argparse.ArgumentParser(prog="train.py", description="Train Text4VPR (default: the demo); "
                                     "the same as `text4vpr train`.")
    add_arguments(parser)
    finish_help(parser)
    args = parser.parse_args(argv)
    return run_entry(lambda: run(args), getattr(args, "debug", False))
