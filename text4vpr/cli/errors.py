"""How the entry points (`text4vpr ...`, `train.py`) end on a user's mistake or Ctrl-C.

A mistake (missing file, bad config key or value, wrong launch) is one line on stderr naming
the file, key or flag and the fix, exit status 2; `--debug` shows the traceback instead.
Ctrl-C is one line per rank, exit status 130.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UsageError(Exception):
    """A mistake in the command line or in the files it names."""


def user_errors() -> tuple[type[BaseException], ...]:
    from text4vpr.config import ConfigError
    from text4vpr.utils.errors import InputError
    from text4vpr.utils.launch_check import LaunchMismatch

    return (UsageError, ConfigError, InputError, LaunchMismatch, FileNotFoundError, NotADirectoryError)


def fail(message: str) -> int:
    from text4vpr.utils.errors import one_line

    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def run_guarded(fn: Callable[[], int], debug: bool = False) -> int:
    """`fn()`, with mistakes and Ctrl-C turned into one line and an exit status."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt as e:  # a plain Ctrl-C, or training stopped on a signal after a checkpoint
        rank = os.environ.get("RANK")
        detail = f": {e}" if str(e) else ""
        print(f"interrupted{f' (rank {rank})' if rank is not None else ''}{detail}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except user_errors() as e:
        if debug:
            raise
        return fail(str(e))


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
