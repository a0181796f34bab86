"""argparse types that refuse impossible numbers when the command line is parsed (one line,
exit 2, naming the flag), not deep inside a run."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def int_between(low: int | None, high: int | None = None):
    """argparse type: an int in [low, high] (None: unbounded on that side)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be at least {low}, got {value}" if high is None else f"must be between {low} and {high}, got {value}")
        return value

    return parse


positive_int = int_between(1)  # a count of locations, images, workers, k
non_negative_int = int_between(0)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (a radius in metres)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def out_folder(text: str) -> str:
    """argparse type: a folder to write into (it may not exist yet), never an existing file."""
    from pathlib import Path

    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; pass a folder to write into")
    return text


def out_file(text: str) -> str:
    """argparse type: a file to write (it may not exist yet), never an existing folder."""
    from pathlib import Path

    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file; pass a file name to write")
    return text
