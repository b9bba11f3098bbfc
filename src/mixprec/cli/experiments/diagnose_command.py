"""`mixprec diagnose`: the gradient-range diagnostic on the demo models."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from mixprec.cli.experiments.loop import Task, train_run
from mixprec.cli.experiments.parity import PARITY_TASKS
from mixprec.cli.experiments.underflow import underflow_task
from mixprec.cli.options import (
    add_threads,
    non_negative_int,
    pin_threads,
    plot_path,
    positive_int,
    report_file,
    share,
)
from mixprec.inspect.diagnose import diagnose

__all__ = ["DEMO_TASKS", "add_arguments", "run"]

DEMO_TASKS: dict[str, Callable[..., Task]] = {**PARITY_TASKS, "underflow": underflow_task}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="digits",
        choices=list(DEMO_TASKS),
        help="digits CNN, sort transformer, or the underflow setting (digits, loss x 2^-16)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="examples (default: the task's)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed")
    parser.add_argument(
        "--train-epochs",
        type=non_negative_int,
        default=0,
        help="train in fp32 for this many epochs first (gradients shrink as a model learns)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model and data")
    parser.add_argument(
        "--underflow-threshold",
        type=share,
        default=1e-3,
        help="largest share of gradient values that may flush to zero",
    )
    parser.add_argument(
        "--overflow-threshold",
        type=share,
        default=0.0,
        help="largest share of gradient values that may overflow",
    )
    parser.add_argument(
        "--plot", type=plot_path, default=None, metavar="PATH.png", help="write the histogram here"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON last")
    add_threads(parser)


def run(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    task = DEMO_TASKS[args.model](tiny=args.tiny)
    torch.manual_seed(args.seed)
    model = task.make_model()
    if args.train_epochs > 0:
        trained = train_run(task, "fp32", args.seed, epochs=args.train_epochs, keep_model=True)
        model = trained.model or model
    x, y, *_ = task.make_data(args.seed)
    n = args.batch_size or task.batch_size
    weight = task.loss_weight

    def loss_func(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return task.loss_func(output, target) * weight

    result = diagnose(
        model,
        (x[:n], y[:n]),
        loss_func,
        underflow_threshold=args.underflow_threshold,
        overflow_threshold=args.overflow_threshold,
    )
    when = f"after {args.train_epochs} fp32 epochs" if args.train_epochs else "at init"
    print(f"{args.model} model {when}, batch of {len(y[:n])}")
    print(result.summary())
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": len(y[:n]), **result.to_dict()}))
    if args.plot:
        path = result.plot(args.plot, title=None)
        report_file("histogram", path, args.json)
    return 0
