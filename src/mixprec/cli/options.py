"""Option types and checks shared by every `mixprec` command: a bad value is refused while the
command line is parsed, before any work starts, in one line saying what was expected and got."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "Parser",
    "add_threads",
    "comma_list",
    "count",
    "int_at_least",
    "int_in",
    "loss_scale",
    "non_negative_int",
    "pin_threads",
    "plot_path",
    "positive_float",
    "positive_int",
    "probability",
    "report_file",
    "share",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default (not for flags, nor where the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "(default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults and whose errors are one line, exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _refuse(expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An option type: an integer >= `minimum`."""
    expected = {0: "an integer >= 0", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _refuse(expected, text) from None
        if value < minimum:
            raise _refuse(expected, text)
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An option type: an integer from `low` to `high`."""
    expected = f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _refuse(expected, text) from None
        if not low <= value <= high:
            raise _refuse(expected, text)
        return value

    parse.__name__ = f"int_in_{low}_{high}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def count(minimum: int = 1) -> Callable[[str], int]:
    """An option type: a whole number >= `minimum`, also written as 1e6."""
    expected = f"a whole number >= {minimum:g} (e.g. 1e6)"

    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise _refuse(expected, text) from None
        if not math.isfinite(value) or value != int(value) or value < minimum:
            raise _refuse(expected, text)
        return int(value)

    parse.__name__ = f"count_{minimum}"
    return parse


def _finite_float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _refuse(expected, text) from None
    if not math.isfinite(value):
        raise _refuse(expected, text)
    return value


def positive_float(text: str) -> float:
    """An option type: a finite number > 0."""
    value = _finite_float(text, "a positive finite number")
    if value <= 0:
        raise _refuse("a positive finite number", text)
    return value


def probability(text: str) -> float:
    """An option type: a number strictly between 0 and 1."""
    value = _finite_float(text, "a number in (0, 1)")
    if not 0 < value < 1:
        raise _refuse("a number in (0, 1)", text)
    return value


def share(text: str) -> float:
    """An option type: a share in [0, 1)."""
    value = _finite_float(text, "a share in [0, 1)")
    if not 0 <= value < 1:
        raise _refuse("a share in [0, 1)", text)
    return value


def loss_scale(text: str) -> float | str:
    """An option type: "dynamic" or a positive finite number (a static scale)."""
    if text.strip().lower() == "dynamic":
        return "dynamic"
    expected = "'dynamic' or a positive finite number"
    value = _finite_float(text, expected)
    if value <= 0:
        raise _refuse(expected, text)
    return value


def comma_list(allowed: list[str]) -> Callable[[str], list[str]]:
    """An option type: a non-empty comma-separated list of names from `allowed`."""
    expected = f"a comma-separated list from {','.join(allowed)}"

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"expected {expected}, got unknown {', '.join(map(repr, unknown))}"
            )
        if not items:
            raise _refuse(expected, text)
        return items

    parse.__name__ = "comma_list"
    return parse


def plot_path(text: str) -> Path | None:
    """An option type: where a PNG may be written ('' for no plot); matplotlib must be present."""
    if text == "":
        return None
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise _refuse("a path ending in .png", text)
    if path.is_dir():
        raise _refuse("a file path, not a directory,", text)
    parent = path.parent
    while not parent.exists():  # the first folder that exists must be one we can write into
        parent = parent.parent
    if not parent.is_dir():
        raise _refuse(f"a path under a folder ({parent} is a file)", text)
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK) or not _creatable(path, parent):
        raise _refuse(f"a path we can write ({target} is not writable)", text)
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError(
            "a plot needs matplotlib, which is not installed: pip install -e '.[plot]' in the "
            "checkout (or pip install matplotlib)"
        )
    return path


def _creatable(path: Path, parent: Path) -> bool:
    # os.access says yes to root on read-only file systems such as /proc: try for real.
    if path.exists():
        return os.access(path, os.W_OK)
    try:
        with tempfile.TemporaryFile(dir=parent):
            return True
    except OSError:
        return False


def add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads, for every command that trains or times: pinned so its numbers reproduce."""
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (pinned)"
    )


def pin_threads(threads: int) -> None:
    """Set torch's CPU thread count."""
    torch.set_num_threads(threads)


def report_file(label: str, path: str | os.PathLike, as_json: bool) -> None:
    """Name a file just written: on stdout, or on stderr when stdout ends with the JSON."""
    print(f"{label}: {path}", file=sys.stderr if as_json else sys.stdout)
