"""Test worker: run a Python program and SIGKILL it at a chosen file rename.

    python tests/kill_at_rename.py {before,after} GLOB (-m MODULE | SCRIPT) [ARGS...]

Runs the program in this process, as `python -m MODULE ARGS` or `python SCRIPT ARGS` would,
with `os.replace` / `os.rename` wrapped: the first rename whose destination (absolute path)
matches GLOB (fnmatch) kills the process with SIGKILL, `before` the rename (a complete temp
file or folder is left behind, not in place) or `after` it (the destination is in place).
text4vpr writes every checkpoint, shard and report by temp name then rename, so these are
real crash points, reached deterministically: no polling, no wall clock, no hook in the
library. A program that never renames onto GLOB exits normally (the test then sees no kill).
"""

from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import sys


def _wrap(rename, when: str, pattern: str):
    def patched(src, dst, *args, **kwargs):
        hit = fnmatch.fnmatch(os.path.abspath(os.fspath(dst)), pattern)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = rename(src, dst, *args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return patched


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("before", "after") or (argv[2] == "-m" and len(argv) < 4):
        sys.exit(__doc__)
    when, pattern, target = argv[0], argv[1], argv[2:]
    os.replace = _wrap(os.replace, when, pattern)
    os.rename = _wrap(os.rename, when, pattern)
    if target[0] == "-m":  # as `python -m`: the working directory first on sys.path
        sys.argv = target[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:  # as `python SCRIPT`: the script's folder first on sys.path
        sys.argv = target
        sys.path[0] = os.path.dirname(os.path.abspath(target[0]))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
