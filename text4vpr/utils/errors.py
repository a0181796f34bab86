"""The one base class of errors caused by what a user handed over (shards, indexes,
checkpoints, spreadsheets, run folders): their message names the file and the fix, and the
command line prints it as one line (exit 2) instead of a traceback."""

from __future__ import annotations


class InputError(Exception):
    """Bad or mismatched input; subclasses keep their builtin base (ValueError, RuntimeError)."""


def one_line(error: BaseException | str) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback in its message: its last line (less the type name) is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and " " not in name else last
    return " ".join(text.split())
