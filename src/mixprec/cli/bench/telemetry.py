"""`mixprec bench telemetry`: what per-step telemetry costs, on and off.

Side by side in one run, the median time of one optimizer step (AdamW, parameters in ~100
tensors, the gradients refreshed untimed before each step as a backward would):

- `fused_off_ms` / `fused_on_ms`: `MixedPrecisionOptimizer(flat_master=True, fused=True)`,
  telemetry off (the default `NO_TELEMETRY`) and on (`Telemetry(every=50)`);
- `autocast_off_ms` / `autocast_on_ms`: `AutocastOptimizer` on fp32 parameters, off and on;
- `off_hook_us`: one call of the "off" hook as the fused step makes it, in microseconds.
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import torch
from torch import nn

from mixprec.cli.bench.common import (
    Case,
    add_common_arguments,
    apply_threads,
    describe_machine,
    format_table,
    print_result,
    side_by_side,
)
from mixprec.cli.bench.overhead import layer_shapes
from mixprec.cli.options import count, positive_int
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.engine.telemetry import NO_TELEMETRY, Telemetry

__all__ = ["add_arguments", "measure", "run"]


def _case(n_params: int, autocast: bool, telemetry: bool) -> Case:
    shapes = layer_shapes(n_params)
    dtype = torch.float32 if autocast else torch.float16
    params = [nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes]
    inner = torch.optim.AdamW(params, lr=1e-4)
    if autocast:
        opt: Any = AutocastOptimizer(inner, 512.0)
    else:
        opt = MixedPrecisionOptimizer(inner, 512.0, flat_master=True, fused=True)
    if telemetry:
        Telemetry(every=50).attach(opt)
    src = [torch.randn(s).to(dtype) for s in shapes]  # "fresh" scaled gradients
    zero = torch.zeros(())

    def setup() -> None:
        for p, g in zip(params, src):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        opt.scale_loss(zero)  # as if backward had run

    return setup, opt.step


def measure(n_params: int = 1_000_000, repeats: int = 15) -> dict[str, Any]:
    """The JSON result (milliseconds per step; the off hook in microseconds)."""
    cases = {
        f"{name}_{state}_ms": _case(n_params, name == "autocast", state == "on")
        for name in ("fused", "autocast")
        for state in ("off", "on")
    }
    times = side_by_side(cases, repeats)
    found_inf, grads = torch.zeros(1), list
    number = 100_000
    hook = timeit.timeit(lambda: NO_TELEMETRY.record_(found_inf, 1.0, grads, 1.0), number=number)
    return {
        "n_params": sum(torch.Size(s).numel() for s in layer_shapes(n_params)),
        **{k: round(v, 3) for k, v in times.items()},
        "off_hook_us": round(hook / number * 1e6, 3),
    }


def format_report(r: dict[str, Any]) -> str:
    """One row per optimizer: off, on, and the ratio."""
    rows = [
        [name, r[f"{name}_off_ms"], r[f"{name}_on_ms"], r[f"{name}_on_ms"] / r[f"{name}_off_ms"]]
        for name in ("fused", "autocast")
    ]
    table = format_table(["step", "off ms", "on ms", "on / off"], rows)
    return (
        f"AdamW step, {r['n_params']:,} params, telemetry off and on ({describe_machine()})\n"
        f"{table}\nthe off hook: {r['off_hook_us']} us per step"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench telemetry`."""
    parser.add_argument("--n-params", type=count(1), default=1e6, help="parameters")
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed steps per case")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success."""
    apply_threads(args.threads)
    result = measure(int(args.n_params), args.repeats)
    print_result(format_report(result), result, args.json)
    return 0
