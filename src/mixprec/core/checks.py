"""Checks that refuse bad input before it changes anything: what there is to train, what
an optimizer holds, and the options the optimizer wrappers share.

Each raises (or warns) with what was expected, what was got and how to fix it. They are
cheap: identity sets and type checks, and one host sync for the range check, which runs
once per conversion, never per step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mixprec.core.dtypes import HALF_DTYPES

__all__ = [
    "check_engine_options",
    "check_flag",
    "check_module",
    "check_optimizer_supported",
    "check_not_half_without_masters",
    "check_param_group",
    "check_optimizer_holds",
    "check_trainable",
    "held_params",
    "real_number",
]

SHOWN = 5  # names listed in a message


def _names(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_module(model: Any, name: str = "model") -> nn.Module:
    """`model` if it is an `nn.Module`, else a TypeError naming what was got."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} must be an nn.Module (the network itself, e.g. nn.Linear(4, 2)); got "
            f"{type(model).__name__} {_short_repr(model)}."
        )
    return model


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """The model parameters `optimizer` holds: a MixedPrecisionOptimizer's model parameters
    (not its masters) and its frozen ones (which have none), any other optimizer's
    parameters."""
    groups = getattr(optimizer, "model_params", None)
    if groups is None:
        groups = [g["params"] for g in optimizer.param_groups]
    frozen = getattr(optimizer, "frozen_params", [])
    return [p for group in [*groups, *frozen] for p in group]


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


def check_param_group(param_group: Any) -> None:
    """Raise a TypeError/ValueError unless `param_group` is a dict whose "params" is a tensor
    or an iterable of tensors (what `add_param_group` takes)."""
    if not isinstance(param_group, dict):
        raise TypeError(
            "a param group must be a dict with a 'params' entry, e.g. "
            f"{{'params': layer.parameters(), 'lr': 1e-3}}; got {type(param_group).__name__}."
        )
    if "params" not in param_group:
        raise ValueError(
            "a param group must have a 'params' entry (the parameters to add), e.g. "
            f"{{'params': layer.parameters()}}; got keys {sorted(param_group)}."
        )
    params = param_group["params"]
    if isinstance(params, (set, frozenset)):
        raise TypeError("a param group's 'params' must be ordered (a list), not a set.")
    if not isinstance(params, torch.Tensor):
        params = param_group["params"] = list(params)
        wrong = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)]
        if wrong:
            raise TypeError(
                f"a param group's 'params' must hold tensors; got {wrong[0]} among them."
            )


def real_number(value: Any) -> float | None:
    """`value` as a float if it is a real number: an int or float, a numpy number, a 0-d
    real tensor (read with one host sync); None for anything else, booleans included."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_flag(name: str, value: Any, *, none_ok: bool = False) -> bool | None:
    """`value` if it is True or False (or None, with `none_ok`); else a TypeError (a string
    "False" would mean True)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{name} must be {allowed}; got {value!r}.")
    return value


# Optimizers the wrappers cannot drive, and why.
_UNSUPPORTED = {
    "LBFGS": "LBFGS re-evaluates the loss through a closure inside step(), which the "
    "loss-scaled step (backward(loss), then step()) cannot give it",
    "SparseAdam": "SparseAdam steps sparse gradients, and mixed precision's unscale, overflow "
    "check and master copies work on dense ones",
}


def check_optimizer_supported(optimizer: Any, model: nn.Module | None = None) -> None:
    """Raise a ValueError if the mixed-precision wrappers cannot step `optimizer` (or its
    type): LBFGS, SparseAdam, parameters on the meta device, sparse-gradient embeddings."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    why = _UNSUPPORTED.get(cls.__name__) if cls.__module__.startswith("torch.optim") else None
    if why is not None:
        raise ValueError(
            f"torch.optim.{cls.__name__} cannot be used with mixed precision: {why}. Use "
            "a first-order optimizer such as torch.optim.AdamW or SGD."
        )
    if isinstance(optimizer, type):
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    meta = [tuple(p.shape) for p in params if p.is_meta]
    if meta:
        raise ValueError(
            f"the optimizer holds {len(meta)} parameter(s) on the meta device (shapes "
            f"{meta[:SHOWN]}), which hold no values to train. Materialize the model first "
            "(model.to_empty(device=...) and initialize it), then build the optimizer."
        )
    if model is not None:
        sparse = [
            name
            for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        ]
        if sparse:
            raise ValueError(
                f"{_names(sparse)}: embedding(s) with sparse=True give sparse gradients, "
                "which mixed precision cannot unscale, check or copy to the fp32 masters. "
                "Build them with sparse=False."
            )
