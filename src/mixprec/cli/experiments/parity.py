"""`mixprec experiment parity`: does mixed precision cost accuracy?

Micikevicius et al. (ICLR 2018) trained with fp16 forward/backward, fp32 master weights and
loss scaling and matched fp32 (ResNet-50: 75.92% fp32, 76.04% mixed). This reproduces the
claim at our scale: the digits CNN and a small transformer sorting token sequences, each in
fp32, fp16 (fp32 masters, dynamic loss scaling) and bf16 (fp32 masters), over several seeds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mixprec.cli.experiments.loop import RunRecord, Task, train_run
from mixprec.cli.experiments.options import PRECISION_NAMES, add_common_arguments, log_run
from mixprec.cli.experiments.plots import plot_loss_curves
from mixprec.cli.experiments.report import Summary, format_table, summarize
from mixprec.cli.experiments.tasks import digits_task, sort_task
from mixprec.cli.options import comma_list, pin_threads, report_file

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


def parity_verdict(
    rows: Sequence[Summary], tolerance: float = TOLERANCE, chance: Mapping[str, float] | None = None
) -> str:
    """One line: is every half precision within `tolerance` of fp32's mean accuracy? PASS only
    when each compared fp32 run learned something (accuracy above `chance[task]`)."""
    gaps = [(r.task, r.precision, r.delta_vs_fp32) for r in rows if r.precision != "fp32"]
    gaps = [(t, p, d) for t, p, d in gaps if d is not None]
    if not gaps:
        return "NO VERDICT: no half-precision run to compare with fp32."
    chance = chance or {}
    for r in rows:
        if r.precision == "fp32" and not r.accuracy_mean > chance.get(r.task, 0.0):
            return (
                f"NO VERDICT: fp32 {r.task} accuracy {100 * r.accuracy_mean:.2f}% is not above "
                f"chance ({100 * chance.get(r.task, 0.0):.2f}%): nothing was learned to compare; "
                "train longer (--epochs, or without --tiny)."
            )
    task, precision, worst = min(gaps, key=lambda g: g[2])
    ok = worst >= -tolerance
    return (
        f"{'PASS' if ok else 'FAIL'}: every half-precision mean accuracy is "
        f"{'within' if ok else 'NOT within'} {100 * tolerance:g} point of fp32 "
        f"(lowest: {task} {precision}, {100 * worst:+.2f} points)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        type=comma_list(list(PARITY_TASKS)),
        default="digits,sort",
        help=f"comma-separated, from {', '.join(PARITY_TASKS)}",
    )
    parser.add_argument(
        "--precisions",
        type=comma_list(PRECISION_NAMES),
        default="fp32,fp16,bf16",
        help=f"comma-separated, from {', '.join(PRECISION_NAMES)}",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    config = ParityConfig(
        tasks=args.tasks,
        precisions=args.precisions,
        seeds=args.seeds,
        epochs=args.epochs,
        tiny=args.tiny,
    )
    records = run_parity(config, on_run=log_run)
    rows = summarize(records)
    chance = {name: PARITY_TASKS[name](tiny=config.tiny).chance for name in config.tasks}
    print(format_table(rows))
    print(parity_verdict(rows, chance=chance))
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in rows]}))
    if args.plot:
        path = plot_loss_curves(
            records, args.plot, "Training loss: fp32 vs mixed precision (mean, min-max band)"
        )
        report_file("loss curves", path, args.json)
    return 0
