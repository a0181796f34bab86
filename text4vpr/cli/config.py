"""`text4vpr config show [--config FILE] [key.sub=value ...]`: the resolved run config, every key."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved run config (every key, YAML)",
                          description="Print the run config that `text4vpr train` with the same arguments would use: "
                                      "the file (default: the packaged demo) and overrides resolved, every key shown.")
    show.add_argument("--config", default=None, help="run config YAML or a packaged config's name (default: demo)")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    from text4vpr.cli.train import print_config

    return print_config(args.config, args.overrides)
