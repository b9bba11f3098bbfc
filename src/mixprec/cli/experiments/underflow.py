"""`mixprec experiment underflow`: fp16 gradients flush to zero without loss scaling.

The setting. The digits CNN, trained as in `parity`, but its objective is the cross-entropy
times a loss weight of 2**-16 (the curves show the plain cross-entropy). The weight stands in
for what makes real gradients small: a loss averaged over 2**16 times more elements than
a digits batch holds (a detector's thousands of anchors, a language model's 2**19-token
batches), which this CPU cannot run in fp16. Every gradient is then 2**16 times smaller than in
plain digits training; most activation gradients fall below 2**-25, half of fp16's smallest
subnormal, and round to zero. Micikevicius et al. (ICLR 2018) found the same for SSD: only
5.3% of its activation gradients stayed non-zero in fp16.

Adam normalises each gradient by its running RMS, so fp32 trains as if the weight were 1:
the gap between fp32 and fp16 without loss scaling is the underflow alone. fp16 with dynamic
loss scaling (initial scale 2**16) multiplies the loss back before the backward pass and
follows fp32; bf16, with fp32's exponent range, needs no scaling.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mixprec.cli.experiments.loop import RunRecord, Task, train_run
from mixprec.cli.experiments.options import PRECISION_NAMES, add_common_arguments, log_run
from mixprec.cli.experiments.plots import plot_loss_curves
from mixprec.cli.experiments.report import format_table, summarize
from mixprec.cli.experiments.tasks import digits_task
from mixprec.cli.options import comma_list, int_in, pin_threads, report_file
from mixprec.core.convert import cast_floats, model_to_float, model_to_half
from mixprec.inspect.diagnose import diagnose, record_activation_gradients, weight_gradients
from mixprec.inspect.gradient_range import GradientHistogram

__all__ = [
    "UnderflowConfig",
    "add_arguments",
    "gradient_census",
    "run",
    "run_underflow",
    "underflow_task",
]

KINDS = ("activations", "weights")


def underflow_task(*, tiny: bool = False, loss_weight_log2: int = -16) -> Task:
    """The digits task with its loss weighted by 2**loss_weight_log2."""
    task = digits_task(tiny=tiny)
    task.name = "underflow"
    task.loss_weight = 2.0**loss_weight_log2
    return task


@dataclass
class UnderflowConfig:
    precisions: Sequence[str] = ("fp32", "fp16-noscale", "fp16", "bf16")
    seeds: int = 3
    epochs: int | None = None
    tiny: bool = False
    loss_weight_log2: int = -16


def _sum(histograms: dict[str, GradientHistogram]) -> GradientHistogram:
    total = GradientHistogram()
    for h in histograms.values():
        total = total + h
    return total


def _nonzero_shares(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], task: Task, dtype, scale: float
) -> dict[str, float]:
    """Share of the gradient values that are non-zero, after one forward and backward of a
    copy of `model` in `dtype` with the objective times `scale`."""
    work = model_to_float(copy.deepcopy(model))
    if dtype != torch.float32:
        model_to_half(work, dtype)
    work.train()
    x, y = batch
    with record_activation_gradients(work) as activations:
        output = work(cast_floats(x, dtype))
        (task.loss_func(output.float(), y) * (task.loss_weight * scale)).backward()
    shares = {}
    for kind, h in (("activations", _sum(activations)), ("weights", _sum(weight_gradients(work)))):
        shares[kind] = h.nonzero / max(h.total, 1)
    return shares


def gradient_census(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], task: Task, scale: float
) -> dict[str, Any]:
    """For one batch: the share of non-zero gradient values in fp32, in fp16 at loss scale 1
    and at `scale`; the share of fp32's non-zero values that flush to zero in fp16 at scale 1
    (measured, and as `diagnose` predicts it from the fp32 gradients)."""
    fp32 = _nonzero_shares(model, batch, task, torch.float32, 1.0)
    fp16 = _nonzero_shares(model, batch, task, torch.float16, 1.0)
    scaled = _nonzero_shares(model, batch, task, torch.float16, scale)
    predicted = diagnose(model, batch, lambda out, y: task.loss_func(out, y) * task.loss_weight)
    return {
        kind: {
            "nonzero_fp32": fp32[kind],
            "nonzero_fp16": fp16[kind],
            "nonzero_fp16_scaled": scaled[kind],
            "flushed_fp16": 1.0 - fp16[kind] / fp32[kind] if fp32[kind] else 0.0,
            "predicted_flush": predicted.shares(kind)["underflow"],  # type: ignore[arg-type]
        }
        for kind in KINDS
    } | {"scale": scale}


def run_underflow(
    config: UnderflowConfig, on_run: Callable[[RunRecord], None] | None = None
) -> tuple[list[RunRecord], dict[str, Any]]:
    """The runs over seeds, and the gradient census at initialisation and after fp32 training
    (seed 0, first training batch), at the loss scale the fp16 run ended with."""
    task = underflow_task(tiny=config.tiny, loss_weight_log2=config.loss_weight_log2)
    records: list[RunRecord] = []
    for seed in range(config.seeds):
        for precision in config.precisions:
            record = train_run(task, precision, seed, epochs=config.epochs, keep_model=seed == 0)
            if on_run is not None:
                on_run(record)
            records.append(record)
    x, y, *_ = task.make_data(0)
    batch = (x[: task.batch_size], y[: task.batch_size])
    scaled = [r.loss_scale for r in records if r.precision == "fp16" and r.seed == 0]
    scale = float(scaled[0]) if scaled and scaled[0] else 2.0**16
    torch.manual_seed(0)
    census = {"at_init": gradient_census(task.make_model(), batch, task, scale)}
    trained = [r.model for r in records if r.precision == "fp32" and r.model is not None]
    if trained:
        census["after_fp32_training"] = gradient_census(trained[0], batch, task, scale)
    for r in records:
        r.model = None
    return records, census


def format_census(census: dict[str, Any]) -> str:
    """The census as a Markdown table."""
    scale = next(iter(census.values()))["scale"]
    lines = [
        f"| gradients of one batch | model | non-zero in fp32 | non-zero in fp16, scale 1 | "
        f"flushed to zero (diagnose predicted) | non-zero in fp16, scale 2^{math.log2(scale):g} |",
        "|---|---|---|---|---|---|",
    ]
    for when, table in census.items():
        for kind in KINDS:
            c = table[kind]
            lines.append(
                f"| {kind} | {when.replace('_', ' ')} | {100 * c['nonzero_fp32']:.1f}% | "
                f"{100 * c['nonzero_fp16']:.1f}% | {100 * c['flushed_fp16']:.1f}% "
                f"({100 * c['predicted_flush']:.1f}%) | {100 * c['nonzero_fp16_scaled']:.1f}% |"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precisions",
        type=comma_list(PRECISION_NAMES),
        default="fp32,fp16-noscale,fp16,bf16",
        help=f"comma-separated, from {', '.join(PRECISION_NAMES)}",
    )
    parser.add_argument(
        "--loss-weight-log2",
        type=int_in(-100, 100),  # 2**k times the loss stays a normal fp32 number
        default=-16,
        help="the objective is the loss times 2**this",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    pin_threads(args.threads)
    config = UnderflowConfig(
        precisions=args.precisions,
        seeds=args.seeds,
        epochs=args.epochs,
        tiny=args.tiny,
        loss_weight_log2=args.loss_weight_log2,
    )
    records, census = run_underflow(config, on_run=log_run)
    rows = summarize(records)
    print(format_table(rows))
    print()
    print(format_census(census))
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in rows], "census": census}))
    if args.plot:
        path = plot_loss_curves(
            records,
            args.plot,
            f"Digits CNN, loss weighted by 2^{config.loss_weight_log2}: "
            "fp16 without loss scaling loses its gradients",
        )
        report_file("loss curves", path, args.json)
    return 0
