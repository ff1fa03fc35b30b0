"""Command-line conventions shared by the project's commands: a user error is one line on stderr
(`error: ...`) and exit status 2, never a traceback or argparse's multi-line usage block.

    p = ArgumentParser(...)
    p.add_argument("--num", type=positive_int)
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        return fail(e)
"""

from __future__ import annotations

import argparse
import math
import sys


class UsageError(Exception):
    """A malformed command line (unknown flag, missing argument, a value of the wrong kind)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting (--help still prints and exits)."""

    def error(self, message):
        raise UsageError(message)


def one_line(message) -> str:
    """Multi-line messages (how-to blocks) folded into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def number_list(cast, what: str):
    """An argparse type for comma-separated values, e.g. number_list(float, "noise levels"): '80,0.7' ->
    (80.0, 0.7); empty items are refused ('1,,2'), so a typo never shortens a list silently."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in str(text).split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def check_output_path(path: str, flag: str) -> None:
    """Raise UsageError unless `path` can be written as a file: its folder exists and it is not a folder."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist (create it first)")
