"""`text4vpr` console command: one module per subcommand, each with `add_arguments(parser)`
and `run(args) -> int`; building the parser imports no torch (`--help` is instant)."""

from __future__ import annotations

import argparse
import importlib

# subcommand name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("text4vpr.cli.synth", "write a synthetic Street360Loc (xlsx + images)"),
    "shards": ("text4vpr.cli.shards", "build or inspect WebDataset shards"),
    "convert-upstream": ("text4vpr.cli.convert", "convert an upstream Text4VPR .pth checkpoint"),
    "index": ("text4vpr.cli.index", "build a retrieval index of database image vectors"),
    "eval": ("text4vpr.cli.evaluate", "evaluate a model on shards: top-k within r metres"),
    "eval-embeddings": ("text4vpr.cli.eval_embeddings", "evaluate precomputed query/database vectors"),
    "localize": ("text4vpr.cli.localize", "locate a place from up to four descriptions"),
    "train": ("text4vpr.cli.train", "train a model; with no arguments the demo (same as `accelerate launch train.py`)"),
    "config": ("text4vpr.cli.config", "show the resolved run config with every key"),
}


def build_parser() -> argparse.ArgumentParser:
    from text4vpr.cli.errors import add_debug_flag
    from text4vpr.cli.help import finish_help

    parser = argparse.ArgumentParser(prog="text4vpr", description="Text4VPR: text-to-place retrieval.")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    finish_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from text4vpr.cli.errors import run_entry

    args = build_parser().parse_args(argv)
    return run_entry(lambda: importlib.import_module(args._module).run(args), args.debug)


if __name__ == "__main__":
    import sys

    sys.exit(main())
