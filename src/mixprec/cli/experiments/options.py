"""Command-line options shared by the experiments, and their progress output."""

from __future__ import annotations

import argparse
import sys

from mixprec.cli.experiments.loop import PRECISIONS, RunRecord

PRECISION_NAMES = list(PRECISIONS)

__all__ = ["PRECISION_NAMES", "add_common_arguments", "check_seeds", "log_run", "parse_list"]


def add_common_arguments(parser: argparse.ArgumentParser, plot_default: str) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="runs per setting, seeds 0..N-1")
    parser.add_argument(
        "--epochs", type=int, default=None, help="override every task's epoch count"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny data and models: a smoke test in seconds"
    )
    parser.add_argument("--plot", default=plot_default, help="PNG of the loss curves ('' for none)")
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON on the last line"
    )


def parse_list(text: str, allowed: list[str], what: str) -> list[str]:
    """Split a comma-separated option and check each item against `allowed`."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise SystemExit(f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return items


def check_seeds(seeds: int) -> None:
    if seeds < 1:
        raise SystemExit(f"--seeds must be >= 1; got {seeds}")


def log_run(record: RunRecord) -> None:
    """One progress line per run, on stderr (stdout ends with the JSON)."""
    print(
        f"  {record.task:<10} {record.precision:<13} seed {record.seed}: accuracy "
        f"{100 * record.accuracy:6.2f}%  valid loss {record.valid_loss:.4f}  "
        f"{record.seconds:6.1f} s  skipped {record.skipped_steps}",
        file=sys.stderr,
        flush=True,
    )
