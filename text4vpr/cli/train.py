"""`text4vpr train`: the same entry as `accelerate launch train.py`."""

from __future__ import annotations


def add_arguments(parser) -> None:
    from text4vpr.train import add_arguments as add

    add(parser)


def run(args) -> int:
    from text4vpr.train import main

    argv = ([f"--config={args.config}"] if args.config else []) + ([f"--resume={args.resume}"] if args.resume else [])
    argv += ["--debug"] if args.debug else []
    argv += ["--print-config"] if args.print_config else []
    return main(argv + list(args.overrides))
