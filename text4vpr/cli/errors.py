"""How every entry point ends: a user's mistake is one line and exit 2 (`--debug`: the
traceback), Ctrl-C one line and 130, a closed output pipe quietly; anything else is a bug
and shows its traceback."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from text4vpr.utils.errors import InputError, one_line, say

# OS errors that come from the user's paths and disks, not from the code
USER_ERRNOS = frozenset({errno.ENOENT, errno.ENOSPC, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                         errno.EROFS, errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOTEMPTY})
SIGPIPE_STATUS = 141  # what a shell reports for a command stopped by a closed pipe (128 + SIGPIPE)


class UsageError(InputError):
    """A mistake in the command line or in the files it names."""


def user_message(e: BaseException) -> str | None:
    """The one line for an error the user can fix; None for a programming error."""
    if isinstance(e, InputError):
        return one_line(e)
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else "writing output"
        return f"{where}: {e.strerror or one_line(e)}"
    return None


def fail(message: str) -> int:
    say(f"error: {one_line(message)}")
    return 2


def _drop_stdout() -> None:
    """Send what stdout still holds to /dev/null, so Python's exit-time flush cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout() -> None:
    """Flush inside the guard: a closed (`| head`) or full stdout fails here, named as such."""
    try:
        sys.stdout.flush()
    except OSError as e:
        _drop_stdout()
        e.filename = e.filename or "<stdout>"
        raise


def run_guarded(fn: Callable[[], int], debug: bool = False) -> int:
    """`fn()`, with user mistakes and Ctrl-C turned into one line and an exit status."""
    try:
        rc = int(fn() or 0)
        _flush_stdout()
        return rc
    except KeyboardInterrupt as e:  # a plain Ctrl-C, or training stopped on a signal after a checkpoint
        rank = os.environ.get("RANK")
        detail = f": {e}" if str(e) else ""
        say(f"interrupted{f' (rank {rank})' if rank is not None else ''}{detail}")
        return 128 + getattr(e, "signum", 2)  # 130 for SIGINT, 143 for SIGTERM
    except BrokenPipeError:  # stdout's reader went away (`text4vpr ... | head`): stop without a word
        if debug:
            raise
        _drop_stdout()
        return SIGPIPE_STATUS
    except Exception as e:
        message = user_message(e)
        if debug or message is None:
            raise
        return fail(message)


def run_entry(command: Callable[[], int], debug: bool = False) -> int:
    """An entry point's whole run: the launch checked, `command()` guarded, ranks leaving together."""
    from text4vpr.utils.launch_check import check_world_size

    def checked() -> int:
        check_world_size()
        return command()

    rc = run_guarded(checked, debug)
    from text4vpr.utils.distributed import leave

    return leave(rc)  # under accelerate launch / torchrun: every rank leaves together


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
