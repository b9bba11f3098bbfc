"""`mixprec bench overhead`: the optimizer phase of mixed precision, mixprec vs torch.amp.

For each size N (parameters in ~100 tensors: 50 square weights and their biases), the
median time per step of, side by side in one run:

- `floor_ms`: the two casts on flat buffers (half grads -> fp32, fp32 masters -> half), the
  pure memory traffic any mixed-precision scheme with fp32 masters pays;
- `mixprec_flat_ms` / `mixprec_tensors_ms`: mixprec's bookkeeping, `flat_master=True` and
  per-tensor: `MixedPrecisionOptimizer.step()` around an optimizer that does nothing (grads to
  masters, fused unscale + overflow check, one host sync, masters to model, scaler update);
- `torch_amp_ms`: the same job done by torch.amp on fp32 params: the casts autocast and
  autograd do (half grads -> new fp32 grads, fp32 params -> new half copies) and
  `GradScaler.step`/`update` around the same do-nothing optimizer;
- `mixprec_step_ms` vs `torch_amp_step_ms`: the whole optimizer phase with AdamW: mixprec's
  fused path (`flat_master=True, fused=True`) vs torch.amp with `AdamW(fused=True)`.

Before every timed call the half gradients are refreshed (untimed), as a backward would.
torch.amp's casts allocate new tensors, as autograd and autocast do; on a CPU that costs
page faults that a GPU's caching allocator avoids, so the table also shows torch.amp's whole
phase with every cast into preallocated tensors (`amp step*`), a lower bound on its cost.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
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
from mixprec.cli.options import count, positive_int
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["KEYS", "SIZES", "add_arguments", "layer_shapes", "measure", "run"]

SIZES: tuple[int, ...] = (1_000_000, 10_000_000, 50_000_000)
KEYS: tuple[str, ...] = (
    "n_params",
    "mixprec_flat_ms",
    "mixprec_tensors_ms",
    "torch_amp_ms",
    "floor_ms",
    "mixprec_step_ms",
    "torch_amp_step_ms",
)


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: isolates the mixed-precision bookkeeping."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def layer_shapes(n_params: int, n_tensors: int = 100) -> list[tuple[int, ...]]:
    """`n_tensors // 2` layers of a (d, d) weight and a (d,) bias, about `n_params` in all."""
    layers = max(1, n_tensors // 2)
    d = max(1, int(math.sqrt(n_params / layers)))
    return [shape for _ in range(layers) for shape in ((d, d), (d,))]


def _params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device):
    return [nn.Parameter(torch.randn(s, device=device).to(dtype) * 0.02) for s in shapes]


def _cases(shapes: Sequence[tuple[int, ...]], device: torch.device) -> dict[str, Case]:
    half = torch.float16
    src = [torch.randn(s, device=device).to(half) for s in shapes]  # "fresh" scaled grads
    n = sum(t.numel() for t in src)
    dummy = torch.zeros((), device=device)

    def refresh(grads: list[torch.Tensor]) -> None:
        torch._foreach_copy_(grads, src)

    # floor: the two casts, one kernel each, on flat buffers
    flat_src = torch.cat([t.reshape(-1) for t in src])
    half_grad, master_grad = torch.empty_like(flat_src), torch.empty(n, device=device)
    master, half_param = torch.randn(n, device=device), torch.empty_like(flat_src)

    def floor() -> None:
        master_grad.copy_(half_grad)
        half_param.copy_(master)

    # mixprec bookkeeping, flat and per tensor
    flat_params = _params(shapes, half, device)
    flat_opt = MixedPrecisionOptimizer(_NoStep(flat_params), 512.0, flat_master=True)
    tensor_params = _params(shapes, half, device)
    tensor_opt = MixedPrecisionOptimizer(_NoStep(tensor_params), 512.0)
    tensor_grads = [torch.empty_like(t) for t in src]

    def flat_setup() -> None:
        refresh([p.grad for p in flat_params])
        flat_opt.scale_loss(dummy)  # marks a backward as done

    def tensor_setup() -> None:
        for p, g in zip(tensor_params, tensor_grads):
            p.grad = g
        refresh(tensor_grads)
        tensor_opt.scale_loss(dummy)

    # torch.amp bookkeeping: fp32 params, grads cast by autograd, weights cast by autocast
    amp_params = _params(shapes, torch.float32, device)
    amp_grads = [torch.empty_like(t) for t in src]
    amp_opt = _NoStep(amp_params)
    amp_scaler = torch.amp.GradScaler(device.type, init_scale=512.0)

    def amp_phase(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params, grads):
        for p, g in zip(params, grads):
            p.grad = g.float()  # ToCopyBackward: a new fp32 grad per parameter
        scaler.step(opt)
        scaler.update()
        casts = [p.to(half) for p in params]  # autocast's weight cast in the next forward
        opt.zero_grad(set_to_none=True)
        return casts

    # whole optimizer phase with AdamW
    step_params = _params(shapes, half, device)
    step_opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(step_params, lr=1e-4), 512.0, flat_master=True, fused=True
    )
    amp_step_params = _params(shapes, torch.float32, device)
    amp_step_grads = [torch.empty_like(t) for t in src]
    amp_step_opt = torch.optim.AdamW(amp_step_params, lr=1e-4, fused=True)
    amp_step_scaler = torch.amp.GradScaler(device.type, init_scale=512.0)

    pre_params = _params(shapes, torch.float32, device)
    pre_grads, pre_casts = [torch.empty_like(t) for t in src], [torch.empty_like(t) for t in src]
    for p in pre_params:
        p.grad = torch.empty_like(p)
    pre_opt = torch.optim.AdamW(pre_params, lr=1e-4, fused=True)
    pre_scaler = torch.amp.GradScaler(device.type, init_scale=512.0)

    def amp_phase_prealloc() -> None:
        torch._foreach_copy_([p.grad for p in pre_params], pre_grads)
        pre_scaler.step(pre_opt)
        pre_scaler.update()
        torch._foreach_copy_(pre_casts, pre_params)

    def step_setup() -> None:
        refresh([p.grad for p in step_params])
        step_opt.scale_loss(dummy)

    def amp_setup(scaler: torch.amp.GradScaler, grads: list[torch.Tensor]) -> None:
        refresh(grads)
        scaler.scale(dummy)  # as a backward of the scaled loss would (creates its scale)

    return {
        "floor_ms": (lambda: half_grad.copy_(flat_src), floor),
        "mixprec_flat_ms": (flat_setup, flat_opt.step),
        "mixprec_tensors_ms": (tensor_setup, tensor_opt.step),
        "torch_amp_ms": (
            lambda: amp_setup(amp_scaler, amp_grads),
            lambda: amp_phase(amp_opt, amp_scaler, amp_params, amp_grads),
        ),
        "mixprec_step_ms": (step_setup, step_opt.step),
        "torch_amp_step_ms": (
            lambda: amp_setup(amp_step_scaler, amp_step_grads),
            lambda: amp_phase(amp_step_opt, amp_step_scaler, amp_step_params, amp_step_grads),
        ),
        "torch_amp_step_prealloc_ms": (
            lambda: amp_setup(pre_scaler, pre_grads),
            amp_phase_prealloc,
        ),
    }


def measure(
    sizes: Sequence[int] = SIZES, repeats: int = 15, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """`{"rows": [...]}`: one row per size with the `KEYS`, times in median milliseconds."""
    return _measure(sizes, repeats, device)[0]


def _measure(
    sizes: Sequence[int], repeats: int, device: str | torch.device
) -> tuple[dict[str, Any], list[float]]:
    """(the JSON result, torch.amp's preallocated-cast step time per size)."""
    device = torch.device(device)
    prealloc: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for size in sizes:
        shapes = layer_shapes(int(size))
        times = side_by_side(_cases(shapes, device), repeats=repeats, sync=sync)
        row: dict[str, Any] = {"n_params": sum(math.prod(s) for s in shapes)}
        row.update({k: round(times[k], 4) for k in KEYS[1:]})
        rows.append(row)
        prealloc.append(round(times["torch_amp_step_prealloc_ms"], 4))
    return {"rows": rows}, prealloc


def format_report(result: dict[str, Any], prealloc: Sequence[float]) -> str:
    """The times and the ratios the targets are stated in, one line per size."""
    headers = [
        "params", "floor", "mp flat", "mp tensors", "amp", "flat/floor", "tensors/floor",
        "amp/floor", "mp step", "amp step", "step/amp", "amp step*", "step/amp*",
    ]  # fmt: skip
    rows = []
    for r, pre in zip(result["rows"], prealloc):
        floor, step = r["floor_ms"], r["mixprec_step_ms"]
        rows.append([
            r["n_params"], floor, r["mixprec_flat_ms"], r["mixprec_tensors_ms"], r["torch_amp_ms"],
            r["mixprec_flat_ms"] / floor, r["mixprec_tensors_ms"] / floor, r["torch_amp_ms"] / floor,
            step, r["torch_amp_step_ms"], step / r["torch_amp_step_ms"], pre, step / pre,
        ])  # fmt: skip
    return (
        f"optimizer-phase overhead, median ms per step ({describe_machine()})\n"
        + format_table(headers, rows)
        + "\n* torch.amp casting into preallocated tensors (a lower bound on its cost)"
        + "\ntargets: flat/floor <= 1.1, step/amp <= 0.8"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench overhead`."""
    parser.add_argument(
        "--sizes", type=count(1), nargs="+", default=list(SIZES),
        help="parameter counts to measure",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=positive_int, default=15, help="timed steps per case (median)"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success."""
    apply_threads(args.threads)
    result, prealloc = _measure([int(s) for s in args.sizes], args.repeats, args.device)
    print_result(format_report(result, prealloc), result, args.json)
    return 0
