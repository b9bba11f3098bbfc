"""`mixprec bench memory`: training-state bytes per parameter, and activation memory.

Training state (everything that lives between steps: params, grads, masters, master grads,
Adam's moments) is counted from the storages of all live tensors after one step, at two
model sizes: the slope is the bytes per parameter, the intercept the fixed workspace.
Layouts: fp32 Adam; fastai v1 (half model, fp32 masters with fp32 grads, built with the
documented primitives); mixprec unfused (`flat_master=True, fused=False`), fused
(`flat_master=True, fused=True`) and split (`master="split"`, bf16: the fp32 masters kept
as the bf16 weights plus 16 low bits), each with its half gradients counted; and the same
stack of `nn.Linear` layers trained two bf16 steps with AdamW by the plain loop
(`MixedPrecisionOptimizer(..., model=model, dtype=torch.bfloat16)`, backward, step,
zero_grad) and by the Learner (`learn.to_fp16(dtype=torch.bfloat16)`, `fit(1)`), counted
after the loop and after `fit`.

Activation memory is the bytes saved for backward (`saved_tensors_hooks`, parameters left
out, each storage once) by one forward pass of a small ResNet and a small GPT, in fp32 and
in fp16 through `model_to_half`.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mixprec.cli.bench.common import (
    add_common_arguments,
    apply_threads,
    describe_machine,
    format_table,
    print_result,
)
from mixprec.cli.bench.models import tiny_gpt, tiny_resnet
from mixprec.cli.bench.overhead import layer_shapes
from mixprec.cli.options import count, positive_int
from mixprec.core.convert import model_to_half
from mixprec.core.master import get_master, master2model, model_g2master_g
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.data import DataBunch
from mixprec.learner.learner import Learner

__all__ = [
    "KEYS",
    "LAYOUTS",
    "add_arguments",
    "live_tensor_bytes",
    "measure",
    "run",
    "saved_bytes",
    "state_bytes",
]

KEYS: tuple[str, ...] = (
    "state_bytes_per_param",
    "saved_bytes_ratio_cnn",
    "saved_bytes_ratio_transformer",
)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def live_tensor_bytes(exclude: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    """{storage address: bytes} of every live tensor (each storage once), minus `exclude`."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            ptr, nbytes = _storage(obj)
            if ptr and ptr not in exclude:
                found[ptr] = nbytes
    return found


def _fp32_adam(shapes) -> Any:
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params)
    opt.step()
    return params, opt


def _fastai_v1(shapes) -> Any:
    model = nn.ParameterList([nn.Parameter(torch.randn(s).half()) for s in shapes])
    for p in model:
        p.grad = torch.randn_like(p)
    model_params, master_params = get_master([model])
    model_g2master_g(model_params, master_params)
    opt = torch.optim.AdamW(master_params[0])
    opt.step()
    master2model(model_params, master_params)
    return model, master_params, opt


def _mixprec(fused: bool) -> Callable[[Any], Any]:
    def build(shapes) -> Any:
        params = [nn.Parameter(torch.randn(s).half()) for s in shapes]
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(params), 512.0, flat_master=True, fused=fused
        )
        for p in params:
            p.grad.copy_(torch.randn_like(p))  # the grads are views into the flat buffer
        opt.scale_loss(torch.zeros(()))  # as if backward had run
        opt.step()
        return params, opt

    return build


def _mixprec_split(shapes) -> Any:
    params = [nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(params), 512.0, master="split")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.scale_loss(torch.zeros(()))  # as if backward had run
    opt.step()
    for p in params:  # the step drops the bf16 grads; the next backward makes them again
        p.grad = torch.zeros_like(p)
    return params, opt


class _Widen(nn.Module):
    """Broadcasts a one-column input to the stack's width: the data stays 16 numbers, so
    only the training state grows with the model."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.width)


def _linear_stack(shapes) -> nn.Module:
    """The (d, d) weight and (d,) bias pairs of `shapes` as a stack of nn.Linear(d, d)."""
    torch.manual_seed(0)
    return nn.Sequential(_Widen(shapes[0][1]), *(nn.Linear(w[1], w[0]) for w in shapes[::2]))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y.expand_as(out))


def _batches() -> DataLoader:
    x = torch.randn(16, 1)
    return DataLoader(TensorDataset(x, -x), batch_size=8)


def _plain_loop(shapes) -> Any:
    model = _linear_stack(shapes)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), model=model,
                                  dtype=torch.bfloat16)  # fmt: skip
    for x, y in _batches():
        opt.backward(_loss(model(x.bfloat16()), y))
        opt.step()
        opt.zero_grad()
    return model, opt


def _learner(shapes) -> Any:
    model = _linear_stack(shapes)
    with tempfile.TemporaryDirectory() as path:
        learn = Learner(DataBunch(_batches(), device="cpu"), model, torch.optim.AdamW, _loss,
                        path=path, progress=False)  # fmt: skip
        learn.to_fp16(dtype=torch.bfloat16)
        learn.fit(1, lr=1e-3)
    return learn


LAYOUTS: dict[str, Callable[[Any], Any]] = {
    "fp32_adam": _fp32_adam,
    "fastai_v1": _fastai_v1,
    "mixprec_unfused": _mixprec(fused=False),
    "mixprec_fused": _mixprec(fused=True),
    "mixprec_split": _mixprec_split,
    "plain_loop_bf16": _plain_loop,
    "learner_bf16": _learner,
}


def state_bytes(build: Callable[[Any], Any], n_params: int) -> tuple[int, int]:
    """(parameters, bytes of the tensors that `build(shapes)` leaves alive)."""
    gc.collect()
    before = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)]  # kept alive:
    exclude = {_storage(t)[0] for t in before}  # so that no new storage can reuse an address
    shapes = layer_shapes(n_params)
    objects = build(shapes)
    gc.collect()
    total = sum(live_tensor_bytes(exclude).values())
    del objects, before
    return sum(int(torch.Size(s).numel()) for s in shapes), total


def _per_param(build: Callable[[Any], Any], n_params: int) -> tuple[float, float]:
    """(bytes per parameter, fixed bytes): slope and intercept between n/2 and n params."""
    n1, b1 = state_bytes(build, n_params // 2)
    n2, b2 = state_bytes(build, n_params)
    slope = (b2 - b1) / (n2 - n1)
    return slope, b2 - slope * n2


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors one forward of `model` saves for backward, parameters left out."""
    params = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in params:
            saved[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def _saved_ratio(make: Callable[[], nn.Module], x: torch.Tensor) -> tuple[int, int]:
    torch.manual_seed(0)
    fp32 = saved_bytes(make(), x)
    half_model = model_to_half(make())
    half = saved_bytes(half_model, x.half() if x.is_floating_point() else x)
    return fp32, half


def measure(n_params: int = 4_000_000, batch: int = 16) -> dict[str, Any]:
    """The JSON result, with exactly the `KEYS`."""
    return _measure(n_params, batch)[0]


def _measure(n_params: int, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON result, the raw byte counts behind it)."""
    if n_params < 1000:
        raise ValueError(f"n_params must be >= 1000 to fit a slope; got {n_params}.")
    per_param, fixed = {}, {}
    for name, build in LAYOUTS.items():
        slope, intercept = _per_param(build, n_params)
        per_param[name], fixed[name] = round(slope, 3), max(0, round(intercept))
    cnn = _saved_ratio(tiny_resnet, torch.randn(batch, 3, 32, 32))
    gpt = _saved_ratio(tiny_gpt, torch.randint(0, 256, (max(1, batch // 4), 64)))
    result = {
        "state_bytes_per_param": per_param,
        "saved_bytes_ratio_cnn": round(cnn[1] / cnn[0], 4),
        "saved_bytes_ratio_transformer": round(gpt[1] / gpt[0], 4),
    }
    details = {
        "n_params": n_params,
        "state_fixed_bytes": fixed,
        "saved_bytes_cnn": {"fp32": cnn[0], "fp16": cnn[1]},
        "saved_bytes_transformer": {"fp32": gpt[0], "fp16": gpt[1]},
    }
    return result, details


def format_report(result: dict[str, Any], d: dict[str, Any]) -> str:
    """Two tables: state per parameter by layout, saved-for-backward bytes by model."""
    state = format_table(
        ["layout", "bytes/param", "fixed bytes", "vs fp32 Adam"],
        [
            [
                name,
                b,
                d["state_fixed_bytes"][name],
                b / result["state_bytes_per_param"]["fp32_adam"],
            ]
            for name, b in result["state_bytes_per_param"].items()
        ],
    )
    saved = format_table(
        ["model", "fp32 bytes", "fp16 bytes", "fp16/fp32"],
        [
            ["resnet (cnn)", *d["saved_bytes_cnn"].values(), result["saved_bytes_ratio_cnn"]],
            ["gpt (transformer)", *d["saved_bytes_transformer"].values(),
             result["saved_bytes_ratio_transformer"]],
        ],
    )  # fmt: skip
    return (
        f"training state with AdamW, {d['n_params']:,} params ({describe_machine()})\n{state}\n"
        "target: mixprec_fused <= 16 bytes/param, mixprec_split <= 14, learner_bf16 <= "
        "plain_loop_bf16\n\n"
        f"activations saved for backward, one forward\n{saved}\ntarget: cnn fp16/fp32 <= 0.52"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench memory`."""
    parser.add_argument(
        "--n-params", type=count(1000), default=4e6, help="model size for the state count"
    )
    parser.add_argument("--batch", type=positive_int, default=16, help="images per forward")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success."""
    apply_threads(args.threads)
    result, details = _measure(int(args.n_params), args.batch)
    print_result(format_report(result, details), result, args.json)
    return 0
