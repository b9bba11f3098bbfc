"""`diagnose`: where a model's gradients fall against the fp16 and bf16 ranges, before training.

Micikevicius et al. (ICLR 2018) plotted the histogram of activation gradients of an SSD
network in fp32 and found that most of them lie below fp16's smallest value; loss scaling
shifts them back into range. `diagnose` draws that histogram for your own model and batch,
and says which loss scales would keep the values inside fp16.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mixprec.core.convert import cast_floats, model_to_float
from mixprec.inspect.gradient_range import FORMATS, FloatFormat, GradientHistogram, GradientRange

__all__ = [
    "FORMATS",
    "FloatFormat",
    "GradientHistogram",
    "GradientRange",
    "diagnose",
    "record_activation_gradients",
    "weight_gradients",
]

MODEL_NAME = "(model)"  # the name under which the root module's own output is recorded


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a share in [0, 1); got {value!r}.")
    return float(value)


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    if not isinstance(batch, Sequence) or isinstance(batch, (str, torch.Tensor)) or len(batch) != 2:
        raise TypeError(
            "batch must be a pair (input, target), as a DataLoader yields it; got "
            f"{type(batch).__name__}. For a model taking several inputs pass ((x1, x2), target)."
        )
    inputs, target = batch
    return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), target


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def weight_gradients(model: nn.Module) -> dict[str, GradientHistogram]:
    """Histograms of the `.grad` of each named parameter that has one."""
    return {
        name: GradientHistogram().add_(p.grad)
        for name, p in model.named_parameters()
        if p.grad is not None
    }


@contextmanager
def record_activation_gradients(model: nn.Module) -> Iterator[dict[str, GradientHistogram]]:
    """Within the block, histogram the gradient reaching every module's output, by module name.

    Tensor hooks on the outputs, so in-place activations and modules of any kind work; each
    output tensor is counted once, under the innermost module that returned it.
    """
    activations: dict[str, GradientHistogram] = {}
    hooked: dict[int, torch.Tensor] = {}  # tensors already hooked, kept alive so ids stay unique

    def grad_hook(histogram: GradientHistogram) -> Callable[[torch.Tensor], None]:
        def count(grad: torch.Tensor) -> None:
            histogram.add_(grad)

        return count

    def forward_hook(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            for t in _tensors(output):
                # Forward hooks fire innermost first, so an output passed up unchanged by its
                # parents (nn.Sequential) is recorded once, under the module that made it.
                if t.requires_grad and t.is_floating_point() and id(t) not in hooked:
                    hooked[id(t)] = t
                    t.register_hook(grad_hook(activations.setdefault(name, GradientHistogram())))

        return record

    handles = [
        module.register_forward_hook(forward_hook(name or MODEL_NAME))
        for name, module in model.named_modules()
    ]
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()
        hooked.clear()


def diagnose(
    model: nn.Module,
    batch: Sequence[Any],
    loss_func: Callable[..., torch.Tensor],
    *,
    underflow_threshold: float = 1e-3,
    overflow_threshold: float = 0.0,
) -> GradientRange:
    """Run one fp32 forward and backward of `loss_func(model(input), target)` on a copy of
    `model` and histogram log2 |gradient| of the weights and of every module's output.

    `batch` is `(input, target)`; `input` may be a tuple of model arguments. The user's model
    (fp32 or already converted to half), its gradients, buffers and the random number
    generators are left untouched; the copy runs in fp32 and in training mode. The result
    reports, for fp16 and bf16, the share of non-zero values that would flush to zero, turn
    subnormal or overflow at loss scale 1, and the power-of-two loss scales keeping the
    underflow share within `underflow_threshold` and the overflow share within
    `overflow_threshold`. `print(result)` shows the summary; `result.plot(path)` the histogram.

    The shares are a lower bound on what an fp16 backward loses: there, a flushed activation
    gradient also drops out of every gradient computed from it further back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if not callable(loss_func):
        raise TypeError(
            f"loss_func must be callable as loss_func(output, target); got {loss_func!r}."
        )
    underflow_threshold = _check_threshold("underflow_threshold", underflow_threshold)
    overflow_threshold = _check_threshold("overflow_threshold", overflow_threshold)
    inputs, target = _split_batch(batch)
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # a model holding non-copyable state
        raise TypeError(
            f"diagnose works on a copy of the model, and copy.deepcopy failed: {error}"
        ) from error
    model_to_float(work)
    work.train()
    for p in work.parameters():
        p.grad = None

    with (
        record_activation_gradients(work) as activations,
        torch.random.fork_rng(devices=_rng_devices(work)),
    ):
        output = work(*cast_floats(inputs, torch.float32))
        loss = loss_func(cast_floats(output, torch.float32), cast_floats(target, torch.float32))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_func must return a scalar tensor (reduce the loss with mean or sum); "
                f"got {type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}."
            )
        loss.backward()
    return GradientRange(
        weights=weight_gradients(work),
        activations=activations,
        loss=float(loss.detach()),
        underflow_threshold=underflow_threshold,
        overflow_threshold=overflow_threshold,
    )
