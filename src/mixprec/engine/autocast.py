"""AutocastOptimizer: loss scaling for an fp32 model whose forward runs under `torch.autocast`.

The second precision mode ("autocast"; see `mixprec.core.modes`): no half model and no masters.
The same `LossScaler` and the same pure functions as `MixedPrecisionOptimizer`, the same
methods, so a loop or a callback drives either one.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixprec.core.checks import (
    check_optimizer_supported,
    check_param_group,
)
from mixprec.core.config import PrecisionConfig
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.interrupts import atomic_region, deferred_interrupt
from mixprec.core.modes import check_saved_mode
from mixprec.core.optim_state import (
    check_optimizer_state_dict,
    drop_incomplete_state_,
    load_optimizer_state_dict,
    optimizer_type_name,
    remove_params_,
)
from mixprec.core.scaler import LossScale, unscale_and_check_
from mixprec.engine import forensics
from mixprec.engine.fused_items import FusedItem
from mixprec.engine.step_hooks import enable_step_hooks
from mixprec.engine.telemetry import NO_TELEMETRY
from mixprec.engine.updates import choose_update
from mixprec.engine.wrapper import OptimizerWrapper, StepState

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["AutocastOptimizer", "autocast_region", "device_type_of"]


def device_type_of(params: Iterable[torch.Tensor]) -> str:
    """The one device type ("cpu", "cuda", ...) of `params`; "cpu" if there are none."""
    types = sorted({p.device.type for p in params})
    if len(types) > 1:
        raise ValueError(
            f"the parameters span device types {types}; autocast covers one: pass "
            "device_type= explicitly."
        )
    return types[0] if types else "cpu"


def autocast_region(device_type: str, dtype: torch.dtype) -> AbstractContextManager:
    """`torch.autocast(device_type, dtype)`: the region the forward and the loss run in,
    entered and left whole even if Ctrl-C comes meanwhile (`atomic_region`), so autocast is
    never left on."""
    return atomic_region(torch.autocast(device_type, dtype=dtype))


class AutocastOptimizer(OptimizerWrapper):
    """Wraps an optimizer of an fp32 model whose forward and loss run under `torch.autocast`.

    The loop::

        model = make_model()                                  # stays fp32
        opt = AutocastOptimizer(torch.optim.AdamW(model.parameters()), "dynamic")
        for x, y in data:
            with opt.autocast():                              # ops in fp16 where safe
                loss = loss_fn(model(x), y)
            opt.backward(loss)                                # scaled backward
            if opt.step():                                    # False: overflow, skipped
                scheduler.step()
            opt.zero_grad()

    The methods, the keyword options (those of `LossScaler`, `clip`, `fused`,
    `data_parallel`) and the step-or-skip rule are `MixedPrecisionOptimizer`'s. Autocast's
    casts are differentiable, so the gradients arrive in fp32 on the fp32 parameters:
    `unscale_` unscales and checks them in place (one fused kernel), `step` makes the one host
    sync per step, and an overflowing step changes no weight and no optimizer state. Several
    `backward` calls before `step` accumulate in fp32. `fused` (default None: whenever the
    optimizer is exactly torch.optim.Adam or AdamW) runs torch's fused Adam(W) kernel, which
    unscales the gradients as it reads them; same numbers within fp32 rounding, `fused=False`
    opts out. Unfused, element-wise optimizers step large parameters through cache-sized
    views (`mixprec.engine.view_step`). `dtype` is the half dtype autocast runs in (fp16 or
    bf16), `device_type` the device autocast covers (default: the parameters'). `model` names
    the parameters in a skipped step's `last_overflow`.
    """

    mode = "autocast"
    flat_master = False  # no masters to lay flat

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        loss_scale: LossScale = "dynamic",
        *,
        dtype: torch.dtype = torch.float16,
        clip: float | None = None,
        fused: bool | None = None,
        device_type: str | None = None,
        process_group: ProcessGroup | None = None,
        data_parallel: bool = True,
        model: nn.Module | None = None,
        **scaler_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "expected a torch.optim.Optimizer built on the fp32 model's parameters; got "
                f"{type(optimizer).__name__}."
            )
        if hasattr(optimizer, "scaler"):
            raise TypeError(
                f"the optimizer is already a {type(optimizer).__name__}; wrap a plain "
                "torch optimizer, once."
            )
        flat_master = scaler_options.pop("flat_master", False)  # False is harmless
        if not isinstance(data_parallel, bool):
            raise TypeError(f"data_parallel must be True or False; got {data_parallel!r}.")
        self.config = PrecisionConfig(
            dtype=dtype, mode="autocast", loss_scale=loss_scale, flat_master=flat_master,
            fused=fused, clip=clip, scaler_options=scaler_options, call="AutocastOptimizer",
        )  # fmt: skip
        clip = self.config.clip
        check_optimizer_supported(optimizer, model if isinstance(model, nn.Module) else None)
        for group in optimizer.param_groups:
            _check_fp32(group["params"])
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device_type = device_type_of(params) if device_type is None else device_type
        if not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(f"torch.autocast does not support device type {self.device_type!r}.")
        self.dtype = dtype
        self.param_names = (
            {}
            if model is None
            else forensics.param_names(model, [g["params"] for g in optimizer.param_groups])
        )
        self.scaler = self.config.new_scaler()
        self.update = choose_update(optimizer, fused)
        self.optimizer = optimizer
        self.clip = clip
        self.process_group = process_group
        self.data_parallel = data_parallel
        self.telemetry = NO_TELEMETRY
        self._init_step()
        enable_step_hooks(self)  # register_step_pre/post_hook work as on torch optimizers

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the fp32 model's parameters."""
        check_param_group(param_group)
        params = param_group["params"]
        _check_fp32([params] if isinstance(params, torch.Tensor) else list(params))
        self.optimizer.add_param_group(param_group)
        self._buffers = None  # the parameters may now span another device
        self.update.invalidate()

    # -- the loop -----------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        """The region for the forward pass and the loss: `torch.autocast` in `dtype`."""
        return autocast_region(self.device_type, self.dtype)

    # -- the layout: an fp32 model, gradients in place (see OptimizerWrapper.step) ---------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _has_new_grads(self) -> bool:
        return any(p.grad is not None for p in self._params())

    def _params_with_grads(self) -> list[torch.Tensor]:
        return [p for p in self._params() if p.grad is not None]

    def _unscale_into_fp32(self, scale: float) -> torch.Tensor | None:
        return unscale_and_check_(self._fp32_grads(), 1.0 / scale)

    def _fp32_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params() if p.grad is not None]

    def _clip_holders(self) -> list[torch.Tensor]:
        return self._params()  # clipping leaves an overflowing step's grads for last_overflow

    def _half_items(self) -> Sequence[Sequence[FusedItem]]:
        """Per group, every parameter with a gradient: its own master, stepped in place."""
        return [
            [
                FusedItem(p, v, None, p.grad, v)
                for p in group["params"]
                if p.grad is not None
                for v in (p.detach(),)
            ]
            for group in self.optimizer.param_groups
        ]

    _fp32_items = _half_items  # the gradients are fp32 already, unscaled by unscale_()

    def _overflow_report(self, from_model_grads: bool) -> forensics.OverflowReport:
        """`last_overflow` of this skipped step: the faulty gradients and weights."""
        report = forensics.overflow_report(
            self._named_grads(), self.scaler.steps, self.scaler.scale
        )
        weights = forensics.weight_faults((name, p, None) for name, p in self._named_params())
        return dataclasses.replace(report, weights=weights)

    def _after_failed_step(self) -> None:
        """After an exception inside the inner step: no half-made lazy state survives and
        the next backward starts a new step."""
        drop_incomplete_state_(self.optimizer)
        self.update.invalidate()
        self.zero_grad()

    def _named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, parameter) of every parameter, in the optimizer's order."""
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                yield self.param_names.get(p, f"param_groups[{i}][{j}]"), p

    def _named_grads(self) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
        """(name, shape, gradient) of every parameter with one, in the optimizer's order."""
        for name, p in self._named_params():
            if p.grad is not None:
                yield name, tuple(p.shape), p.grad

    def _zero_grads(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The mode, the wrapped optimizer's state and the scaler's state (the weights are the
        model's own: save `model.state_dict()` beside it)."""
        return {
            "mode": self.mode,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": optimizer_type_name(self.optimizer),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore the optimizer and scaler state; all of it or, if `state_dict` does not fit
        (see `check_state_dict`), none of it."""
        self.check_state_dict(state_dict)
        with deferred_interrupt():
            load_optimizer_state_dict(self.optimizer, state_dict["optimizer"])
            self.scaler.load_state_dict(state_dict["scaler"])
            self.update.invalidate()
            self.zero_grad()

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise a ValueError (TypeError for a non-mapping) naming what in `state_dict` this
        optimizer cannot take: the mode, the wrapped optimizer's type, groups and
        per-parameter state, the scaler's state. Changes nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "expected an AutocastOptimizer state_dict (from opt.state_dict()); got "
                f"{type(state_dict).__name__}."
            )
        check_saved_mode(state_dict, "autocast")
        missing = {"optimizer", "scaler"} - set(state_dict)
        if missing:
            raise ValueError(
                f"not an AutocastOptimizer state_dict: missing {sorted(missing)}; got keys "
                f"{sorted(state_dict)}."
            )
        check_optimizer_state_dict(
            self.optimizer, state_dict["optimizer"], None, state_dict.get("optimizer_type")
        )
        copy.deepcopy(self.scaler).load_state_dict(state_dict["scaler"])

    def remove_params(self, params: Iterable[torch.Tensor]) -> None:
        """Stop stepping the model parameters `params` (say, of a module replaced in the
        model): they leave their param groups (emptied groups stay) with their optimizer
        state. Checked before anything changes: each must be held, and no step under way."""
        params = list(params)
        if self._state is not StepState.READY:
            raise RuntimeError(
                "remove_params() between backward() and step(): call step() or zero_grad() first."
            )
        with deferred_interrupt():
            remove_params_(self.optimizer, params)  # checks them first
            for p in params:
                self.param_names.pop(p, None)
            self._buffers = None
            self.update.invalidate()

    def __repr__(self) -> str:
        return (
            f"AutocastOptimizer({self.optimizer.__class__.__name__}, scaler={self.scaler!r}, "
            f"dtype={self.dtype}, device_type={self.device_type!r}, clip={self.clip}, "
            f"fused={self.fused})"
        )


def _check_fp32(params: Iterable[torch.Tensor]) -> None:
    params = list(params)
    complex_ = [tuple(p.shape) for p in params if p.is_complex()]
    if complex_:
        raise TypeError(
            f"the optimizer holds {len(complex_)} complex parameter(s) (shapes {complex_[:4]}); "
            "the overflow check and unscaling are real. Store each as a real tensor, "
            "nn.Parameter(torch.view_as_real(w)), and use torch.view_as_complex(self.w) in "
            "forward."
        )
    half = sorted({str(p.dtype) for p in params if p.dtype in HALF_DTYPES})
    if half:
        raise ValueError(
            f"mode='autocast' trains an fp32 model, but the optimizer holds {', '.join(half)} "
            "parameters. Keep the model in fp32 (model_to_float(model)), or train the half "
            "model with MixedPrecisionOptimizer (mode='master')."
        )
