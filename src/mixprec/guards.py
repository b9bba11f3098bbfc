"""Checks that refuse bad input before it changes anything: what there is to train, what
an optimizer holds, what a batch is, and weights that fp16 cannot hold.

Each raises (or warns) with what was expected, what was got and how to fix it. They are
cheap: identity sets and type checks, and one host sync for the range check, which runs
once per conversion, never per step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .convert import HALF_DTYPES

__all__ = [
    "check_batch",
    "check_metrics",
    "check_not_half_without_masters",
    "check_optimizer_holds",
    "check_trainable",
    "held_params",
    "warn_out_of_range",
]

SHOWN = 5  # names listed in a message


def _names(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_trainable(model: nn.Module, *, frozen_ok: bool = False) -> None:
    """Raise a ValueError if `model` has no floating-point parameter, or (unless
    `frozen_ok`) none with requires_grad."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError(
            f"the model ({type(model).__name__}) has no floating-point parameters: there is "
            "nothing to train in mixed precision (or at all). Pass the model that holds the "
            "weights."
        )
    if not frozen_ok and not any(p.requires_grad for p in params):
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters: all "
            f"{len(params)} have requires_grad=False, so fitting would train nothing. "
            "Unfreeze some (learn.unfreeze() or p.requires_grad_(True))."
        )


def check_optimizer_holds(
    model: nn.Module, held: Iterable[torch.Tensor], *, every_trainable: bool = True
) -> None:
    """Raise a ValueError if the optimizer's parameters `held` include tensors that are not
    `model`'s, or (with `every_trainable`) miss some of its trainable parameters."""
    named = dict(model.named_parameters())
    ours = {id(p) for p in named.values()}
    held = list(held)
    held_ids = {id(p) for p in held}
    foreign = [p for p in held if id(p) not in ours]
    if foreign:
        shapes = ", ".join(f"{p.dtype} {tuple(p.shape)}" for p in foreign[:SHOWN])
        raise ValueError(
            f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the "
            f"model ({shapes}{', ...' if len(foreign) > SHOWN else ''}): it would step "
            "something else. Build it on this model's parameters, after converting it: "
            "opt = torch.optim.AdamW(model.parameters())."
        )
    if every_trainable:
        missing = [n for n, p in named.items() if p.requires_grad and id(p) not in held_ids]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} trainable parameter(s) of the "
                f"model ({_names(missing)}): they would get gradients but never change. Add "
                "them to the optimizer (or to a layer group), or freeze them with "
                "requires_grad_(False)."
            )


def held_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The model parameters `optimizer` steps: a MixedPrecisionOptimizer's model parameters
    (not its masters), any other optimizer's parameters."""
    groups = getattr(optimizer, "model_params", None)
    if groups is None:
        groups = [g["params"] for g in optimizer.param_groups]
    return [p for group in groups for p in group]


def check_not_half_without_masters(model: nn.Module) -> None:
    """Raise a ValueError if `model` holds fp16/bf16 parameters that an fp32 training loop
    would step directly, without fp32 master weights."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in HALF_DTYPES]
    if half:
        dtype = dict(model.named_parameters())[half[0]].dtype
        raise ValueError(
            f"the model holds {len(half)} trainable {dtype} parameter(s) ({_names(half)}) but "
            "this learner trains in fp32: the optimizer would step the half weights directly "
            "and lose every update below half precision's resolution. Call learn.to_fp16() "
            "for fp32 master weights, or learn.to_fp32() to train in fp32."
        )


def warn_out_of_range(modules: Iterable[tuple[str, nn.Module]], dtype: torch.dtype) -> None:
    """Warn (RuntimeWarning) about the fp32 weights of `modules` ((name, module) pairs) that
    would become inf in `dtype`, or already are inf/nan; call it before converting them."""
    from .planning import _range_warnings  # planning imports convert, which calls this

    if dtype != torch.float16:  # bf16 has the range of fp32
        return
    named = [
        (f"{name}.{pname}" if name else pname, name, p.detach())
        for name, module in modules
        for pname, p in module.named_parameters(recurse=False)
        if p.dtype == torch.float32 and p.numel() and p.device.type != "meta"
    ]
    if not named:
        return
    with torch.no_grad():
        device = named[0][2].device
        peaks = torch.stack(
            [n.to(device) for n in torch._foreach_norm([w for *_, w in named], math.inf)]
        )
        suspects = (~(peaks <= torch.finfo(dtype).max)).nonzero().flatten().tolist()  # one sync
    found = [
        w for i in suspects for w in _range_warnings(named[i][0], named[i][1], named[i][2], dtype)
    ]
    if found:
        warnings.warn(
            "converting to float16 would break the model before training: " + " ".join(found),
            RuntimeWarning,
            stacklevel=3,
        )


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    kind = f"{type(obj).__module__}.{type(obj).__name__}".removeprefix("builtins.")
    return f"{kind} of length {len(obj)}" if isinstance(obj, (list, tuple, Mapping, str)) else kind


def check_batch(batch: Any, index: int) -> None:
    """Raise a TypeError unless `batch` is an (input, target) pair each holding a tensor
    (alone or in a tuple, list or dict)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {index} must be an (input, target) pair; got {_describe(batch)}. A "
            "DataLoader over TensorDataset(x, y) yields such pairs."
        )
    for what, part in zip(("input", "target"), batch):
        if not _holds_tensor(part):
            raise TypeError(
                f"batch {index}: the {what} holds no tensor; got {_describe(part)}. Convert "
                "it with torch.as_tensor (torch.from_numpy for arrays), or let the "
                "DataLoader's default collate_fn do it."
            )


def check_metrics(metrics: Any) -> list[Any]:
    """`metrics` as a list (one callable alone is a list of one, as in fastai v1); raise a
    TypeError if one of them is not callable."""
    metrics = [metrics] if callable(metrics) or isinstance(metrics, str) else list(metrics)
    wrong = [m for m in metrics if not callable(m)]
    if wrong:
        raise TypeError(
            f"metrics must be callables metric(output, target); got {wrong[0]!r} "
            f"({type(wrong[0]).__name__}). Pass the function itself, e.g. metrics=[accuracy]."
        )
    return metrics


def check_engine_options(clip: Any, data_parallel: Any) -> float | None:
    """Validate the options both optimizer wrappers take; return `clip` as a float or None."""
    if clip is not None and (
        isinstance(clip, bool)
        or not isinstance(clip, (int, float))
        or not math.isfinite(clip)
        or clip <= 0
    ):
        raise ValueError(f"clip must be None or a positive finite max norm; got {clip!r}.")
    if not isinstance(data_parallel, bool):
        raise TypeError(f"data_parallel must be True or False; got {data_parallel!r}.")
    return None if clip is None else float(clip)
