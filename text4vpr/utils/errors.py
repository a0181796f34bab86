"""The one base class of errors caused by what a user handed over (shards, indexes,
checkpoints, spreadsheets, run folders): their message names the file and the fix, and the
command line prints it as one line (exit 2) instead of a traceback."""

from __future__ import annotations

import sys
from pathlib import Path


class InputError(Exception):
    """Bad or mismatched input; subclasses keep their builtin base (ValueError, RuntimeError)."""


class InputValueError(InputError, ValueError):
    """A value from the user's files or settings that the computation cannot take."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named is not there (or not complete)."""


def say(line: str, stream=None) -> None:
    """One line on stderr (or `stream`) in one write: ranks sharing a pipe never glue their lines together."""
    stream = stream or sys.stderr
    stream.write(f"{line}\n")
    stream.flush()


def one_line(error: BaseException | str) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback in its message: its last line (less the type name) is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and " " not in name else last
    return " ".join(text.split())


def weights_only_reason(error: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file: the line of torch's long message
    that names the type it would not unpickle."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((line for line in lines if "but got" in line or "Unsupported global" in line), lines[0])
    return line.split(" was not an allowed global")[0][:300]  # not torch's advice to allow-list it


def file_records_problem(records, what: str) -> str | None:
    """What is wrong with a list of {name, count} file records read from a user's folder
    (a shard manifest, an index header); None when every name is a plain file name inside
    that folder, so a crafted name never becomes a path elsewhere."""
    if not isinstance(records, list):
        return f"no list of {what}s"
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("count"), int)):
            return f"{what} {i} is not a {{name, count}} record"
        if Path(r["name"]).name != r["name"] or r["name"] in ("", ".", ".."):
            return f"{what} {i} name {r['name']!r} is not a plain file name"
    return None
