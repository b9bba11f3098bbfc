"""`mixprec experiment parity`: does mixed precision cost accuracy?

Micikevicius et al. (ICLR 2018) trained with fp16 forward/backward, fp32 master weights and
loss scaling and matched fp32 (ResNet-50: 75.92% fp32, 76.04% mixed). This reproduces the
claim at our scale: the digits CNN and a small transformer sorting token sequences, each in
fp32, fp16 (fp32 masters, dynamic loss scaling) and bf16 (fp32 masters), over several seeds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mixprec.cli.experiments.loop import RunRecord, Task, train_run
from mixprec.cli.experiments.options import (
    PRECISION_NAMES,
    add_common_arguments,
    check_seeds,
    log_run,
    parse_list,
)
from mixprec.cli.experiments.plots import plot_loss_curves
from mixprec.cli.experiments.report import Summary, format_table, summarize
from mixprec.cli.experiments.tasks import digits_task, sort_task

__all__ = ["PARITY_TASKS", "ParityConfig", "add_arguments", "parity_verdict", "run", "run_parity"]

PARITY_TASKS: dict[str, Callable[..., Task]] = {"digits": digits_task, "sort": sort_task}
TOLERANCE = 0.01  # one accuracy point


@dataclass
class ParityConfig:
    tasks: Sequence[str] = ("digits", "sort")
    precisions: Sequence[str] = ("fp32", "fp16", "bf16")
    seeds: int = 3
    epochs: int | None = None
    tiny: bool = False


def run_parity(
    config: ParityConfig, on_run: Callable[[RunRecord], None] | None = None
) -> list[RunRecord]:
    """Every task in every precision for seeds 0..seeds-1; `on_run` sees each finished run."""
    records = []
    for name in config.tasks:
        task = PARITY_TASKS[name](tiny=config.tiny)
        for seed in range(config.seeds):
            for precision in config.precisions:
                record = train_run(task, precision, seed, epochs=config.epochs)
                if on_run is not None:
                    on_run(record)
                records.append(record)
    return records


def parity_verdict(rows: Sequence[Summary], tolerance: float = TOLERANCE) -> str:
    """One line: is every half precision within `tolerance` of fp32's mean accuracy?"""
    gaps = [(r.task, r.precision, r.delta_vs_fp32) for r in rows if r.precision != "fp32"]
    gaps = [(t, p, d) for t, p, d in gaps if d is not None]
    if not gaps:
        return "no half-precision run to compare with fp32."
    task, precision, worst = min(gaps, key=lambda g: g[2])
    ok = worst >= -tolerance
    return (
        f"{'PASS' if ok else 'FAIL'}: every half-precision mean accuracy is "
        f"{'within' if ok else 'NOT within'} {100 * tolerance:g} point of fp32 "
        f"(lowest: {task} {precision}, {100 * worst:+.2f} points)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", default="digits,sort", help=f"comma-separated, from {', '.join(PARITY_TASKS)}"
    )
    parser.add_argument(
        "--precisions",
        default="fp32,fp16,bf16",
        help=f"comma-separated, from {', '.join(PRECISION_NAMES)}",
    )
    add_common_arguments(parser, plot_default="parity.png")


def run(args: argparse.Namespace) -> int:
    check_seeds(args.seeds)
    config = ParityConfig(
        tasks=parse_list(args.tasks, list(PARITY_TASKS), "task"),
        precisions=parse_list(args.precisions, PRECISION_NAMES, "precision"),
        seeds=args.seeds,
        epochs=args.epochs,
        tiny=args.tiny,
    )
    records = run_parity(config, on_run=log_run)
    rows = summarize(records)
    print(format_table(rows))
    print(parity_verdict(rows))
    if args.plot:
        path = plot_loss_curves(
            records, args.plot, "Training loss: fp32 vs mixed precision (mean, min-max band)"
        )
        print(f"loss curves: {path}")
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in rows]}))
    return 0
