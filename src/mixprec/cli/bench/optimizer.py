"""`mixprec bench optimizer`: the optimizer phase alone, against the memory-bandwidth floor.

For each size N, a model of N / 2**20 `nn.Linear(1024, 1024, bias=False)` layers (eight of
them: 8.4M parameters) is stepped with AdamW from fresh gradients, side by side in one
process (interleaved rounds, medians):

- `torch_fused`: `torch.optim.AdamW(fused=True)` on the fp32 model, fp32 gradients;
- `torch_foreach`: `torch.optim.AdamW(foreach=True)`, the same;
- `mixprec`: `MixedPrecisionOptimizer(AdamW, model=m, dtype=torch.bfloat16)` (its default,
  the fused step from the bf16 gradients);
- `mixprec_flat`: the same with `flat_master=True`;
- `mixprec_split`: the same with `master="split"`;
- `autocast`: `AutocastOptimizer(AdamW, dtype=torch.bfloat16)` on the fp32 model, whose
  gradients arrive in fp32.

Before every timed step the gradients are set (untimed) to random bf16 values, in each
case's gradient dtype, as a backward would leave them. The step's own bytes per parameter
(`BYTES`) count each tensor read or written once per step, in its dtype; GB/s is those bytes
over the median time. `clock="cpu"` times the step's CPU time (`time.thread_time`, one
thread) instead of the wall clock: on a shared machine it leaves out the time other
processes hold the core, though not their share of the memory bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mixprec.cli.bench.common import (
    Case,
    add_common_arguments,
    apply_threads,
    cuda_missing,
    describe_machine,
    format_table,
    print_result,
    side_by_side,
)
from mixprec.cli.options import count, positive_int
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["BYTES", "CASES", "SIZES", "add_arguments", "format_report", "measure", "run"]

SIZES: tuple[int, ...] = (1 << 20, 1 << 23, 1 << 26)
WIDTH = 1024  # each layer: a WIDTH x WIDTH weight

# bytes read + written per parameter by one step
BYTES: dict[str, int] = {
    # grad 4 read, param 4 + 4, moments 8 + 8
    "torch_fused": 28,
    "torch_foreach": 28,  # the same tensors, several passes (counted once)
    # bf16 grad 2 read, fp32 master 4 + 4, moments 8 + 8, bf16 weight 2 written
    "mixprec": 28,
    "mixprec_flat": 30,  # + the bf16 grad zeroed as it is read (2 written)
    # bf16 grad 2, bf16 weight 2 + 2 and int16 low bits 2 + 2, moments 8 + 8
    "mixprec_split": 26,
    # fp32 grad 4 read, fp32 param 4 + 4, moments 8 + 8
    "autocast": 28,
}
CASES: tuple[str, ...] = tuple(BYTES)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
LABELS: dict[str, str] = {
    "torch_fused": "torch AdamW(fused=True), fp32",
    "torch_foreach": "torch AdamW(foreach=True), fp32",
    "mixprec": "mixprec default (bf16, fused)",
    "mixprec_flat": "mixprec flat_master=True",
    "mixprec_split": 'mixprec master="split"',
    "autocast": "mixprec AutocastOptimizer",
}


def _model(layers: int) -> nn.Module:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))


def _cases(layers: int, device: torch.device) -> dict[str, Case]:
    torch.manual_seed(0)
    shapes = [(WIDTH, WIDTH)] * layers
    src = [torch.randn(s, device=device).to(torch.bfloat16) for s in shapes]  # the "backward"
    src32 = [g.float() for g in src]
    dummy = torch.zeros((), device=device)
    cases: dict[str, Case] = {}

    def bind(
        params: list[nn.Parameter], values: list[torch.Tensor], wrapper: Any = None
    ) -> Callable[[], None]:
        """Setup: every parameter's gradient (a buffer kept across steps) set to `values`,
        and for a mixprec `wrapper` a backward marked as done."""
        grads = [torch.empty_like(v) for v in values]

        def setup() -> None:
            for p, g in zip(params, grads):
                if p.grad is None:  # mixprec's step drops the gradients it read
                    p.grad = g
            torch._foreach_copy_([p.grad for p in params], values)
            if wrapper is not None:
                wrapper.scale_loss(dummy)

        return setup

    for name, fused in (("torch_fused", True), ("torch_foreach", False)):
        params = list(_model(layers).to(device).parameters())
        opt = torch.optim.AdamW(params, fused=fused, foreach=not fused)
        cases[name] = (bind(params, src32), opt.step)

    for name, options in (
        ("mixprec", {}),
        ("mixprec_flat", {"flat_master": True}),
        ("mixprec_split", {"master": "split"}),
    ):
        m = _model(layers).to(device)
        mp = MixedPrecisionOptimizer(
            torch.optim.AdamW(m.parameters()), model=m, dtype=torch.bfloat16, **options
        )
        cases[name] = (bind(list(m.parameters()), src, mp), mp.step)

    params = list(_model(layers).to(device).parameters())
    ac = AutocastOptimizer(torch.optim.AdamW(params), dtype=torch.bfloat16)
    cases["autocast"] = (bind(params, src32, ac), ac.step)
    return cases


def measure(
    sizes: Sequence[int] = SIZES,
    repeats: int = 15,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    clock: str = "wall",
) -> dict[str, Any]:
    """`{"rows": [...]}`: per size and case the median ms, bytes per parameter, GB/s and the
    ratio to torch's fused AdamW's time."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for size in sizes:
        layers = max(1, round(int(size) / WIDTH**2))
        n = layers * WIDTH * WIDTH
        times = side_by_side(
            _cases(layers, device), repeats=repeats, warmup=warmup, sync=sync, clock=CLOCKS[clock]
        )
        gc.collect()  # the cases of one size go before the next size's are built
        for name in CASES:
            ms = times[name]
            rows.append(
                {
                    "n_params": n,
                    "case": name,
                    "ms": round(ms, 4),
                    "bytes_per_param": BYTES[name],
                    "gb_s": round(BYTES[name] * n / (ms * 1e-3) / 1e9, 3),
                    "vs_torch_fused": round(ms / times["torch_fused"], 4),
                }
            )
    return {"rows": rows, "clock": clock}


def format_report(result: dict[str, Any]) -> str:
    """One line per size and case: ms, bytes per parameter, GB/s, ratio to torch fused."""
    headers = ["params", "step", "ms", "B/param", "GB/s", "vs torch fused"]
    rows = [
        [r["n_params"], LABELS[r["case"]], r["ms"], r["bytes_per_param"], r["gb_s"],
         r["vs_torch_fused"]]
        for r in result["rows"]
    ]  # fmt: skip
    return (
        f"optimizer phase: one AdamW step, median {result['clock']}-clock ms "
        f"({describe_machine()})\n"
        + format_table(headers, rows)
        + "\nB/param: bytes each step reads and writes per parameter, each tensor counted once"
        + " in its dtype (torch: grad 4, param 4+4, moments 8+8; mixprec: bf16 grad 2, master"
        + " 4+4, moments 8+8, bf16 weight 2; flat +2 zeroing the grad; split: grad 2, weight"
        + " 2+2, low bits 2+2, moments 8+8); not counted: the overflow check's read of the"
        + " gradients before the update (mixprec +2, AutocastOptimizer +4)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench optimizer`."""
    parser.add_argument(
        "--sizes", type=count(1), nargs="+", default=list(SIZES),
        help="parameter counts to measure (rounded to whole 1024x1024 layers)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=positive_int, default=15, help="timed steps per case (median)"
    )
    parser.add_argument(
        "--warmup", type=count(0), default=2, help="untimed rounds before the timed ones"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall",
        help="wall: elapsed time; cpu: the thread's CPU time (steadier on a shared machine)",
    )  # fmt: skip
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success."""
    apply_threads(args.threads)
    if cuda_missing(args.device):
        return 2
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        print(
            "mixprec bench optimizer: error: --clock cpu times one CPU thread; use it with "
            "--threads 1 --device cpu.",
            file=sys.stderr,
        )
        return 2
    result = measure(
        [int(s) for s in args.sizes], args.repeats, args.warmup, args.device, args.clock
    )
    print_result(format_report(result), result, args.json)
    return 0
