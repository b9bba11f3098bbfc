"""Command-line options shared by the experiments, and their progress output."""

from __future__ import annotations

import argparse
import sys

from mixprec.cli.experiments.loop import PRECISIONS, RunRecord
from mixprec.cli.options import add_threads, plot_path, positive_int

PRECISION_NAMES = list(PRECISIONS)

__all__ = ["PRECISION_NAMES", "add_common_arguments", "log_run"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="runs per setting, seeds 0..N-1"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="override every task's epoch count (default: the task's)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny data and models: a smoke test in seconds"
    )
    parser.add_argument(
        "--plot",
        type=plot_path,
        default=None,
        metavar="PATH.png",
        help="write the loss curves here",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON on the last line"
    )
    add_threads(parser)


def log_run(record: RunRecord) -> None:
    """One progress line per run, on stderr (stdout ends with the JSON)."""
    print(
        f"  {record.task:<10} {record.precision:<13} seed {record.seed}: accuracy "
        f"{100 * record.accuracy:6.2f}%  valid loss {record.valid_loss:.4f}  "
        f"{record.seconds:6.1f} s  skipped {record.skipped_steps}",
        file=sys.stderr,
        flush=True,
    )
