"""AutocastOptimizer: loss scaling for an fp32 model whose forward runs under `torch.autocast`.

The second precision mode ("autocast"; see `mixprec.core.modes`): no half model and no masters.
The same `LossScaler` and the same pure functions as `MixedPrecisionOptimizer`, the same
methods, so a loop or a callback drives either one.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixprec.core.checks import (
    check_engine_options,
    check_flag,
    check_optimizer_supported,
    check_param_group,
)
from mixprec.core.dtypes import HALF_DTYPES, check_half_dtype
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.modes import check_mode_options, check_saved_mode
from mixprec.core.optim_state import (
    check_optimizer_state_dict,
    drop_incomplete_state_,
    optimizer_type_name,
    remove_params_,
)
from mixprec.core.scaler import LossScale, LossScaler, unscale_and_check_
from mixprec.engine import forensics
from mixprec.engine.fused_adam import (
    FusedAdamStep,
    FusedItem,
    fused_unsupported_reason,
    step_from_master_grads_,
)
from mixprec.engine.telemetry import NO_TELEMETRY
from mixprec.engine.view_step import ViewStep
from mixprec.engine.wrapper import OptimizerWrapper, enable_step_hooks

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
    """`torch.autocast(device_type, dtype)`: the region the forward and the loss run in."""
    return torch.autocast(device_type, dtype=dtype)


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
        check_mode_options("autocast", "AutocastOptimizer", show_mode=False, **scaler_options)
        scaler_options.pop("flat_master", None)  # False is harmless: nothing to lay out
        clip = check_engine_options(clip, data_parallel)
        check_flag("fused", fused, none_ok=True)
        check_optimizer_supported(optimizer, model if isinstance(model, nn.Module) else None)
        for group in optimizer.param_groups:
            _check_fp32(group["params"])
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.device_type = device_type_of(params) if device_type is None else device_type
        if not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(f"torch.autocast does not support device type {self.device_type!r}.")
        self.dtype = check_half_dtype(dtype)
        self.param_names = (
            {}
            if model is None
            else forensics.param_names(model, [g["params"] for g in optimizer.param_groups])
        )
        self.scaler = LossScaler(loss_scale, **scaler_options)
        self._auto_fused = fused is None
        if fused is None:
            fused = fused_unsupported_reason(optimizer) is None
        self._fused = FusedAdamStep(optimizer) if fused else None  # validates the optimizer
        self._view_step = ViewStep(optimizer) if ViewStep.supported(optimizer) else None
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.optimizer = optimizer
        self.clip = clip
        self.process_group = process_group
        self.data_parallel = data_parallel
        self.telemetry = NO_TELEMETRY
        self.last_grad_norm: torch.Tensor | None = None
        self.last_overflow: forensics.OverflowReport | None = None  # of the last skipped step
        self._has_grads = False  # backward ran since the last step
        self._found_inf: torch.Tensor | None = None  # set by unscale_(), consumed by step()
        enable_step_hooks(self)  # register_step_pre/post_hook work as on torch optimizers

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the fp32 model's parameters."""
        check_param_group(param_group)
        params = param_group["params"]
        _check_fp32([params] if isinstance(params, torch.Tensor) else list(params))
        self.optimizer.add_param_group(param_group)
        self._buffers = None  # the parameters may now span another device
        if self._fused is not None:
            self._fused.invalidate()

    # -- the loop -----------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        """The region for the forward pass and the loss: `torch.autocast` in `dtype`."""
        return autocast_region(self.device_type, self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the fp32 loss times the loss scale, ready for `.backward()`."""
        if self._found_inf is not None:
            raise RuntimeError(
                "unscale_() was already called for this step; call step() before the next "
                "backward. Expected order: backward(loss) [x N], unscale_() (optional), step()."
            )
        self._has_grads = True
        return self.scaler.scale_loss(loss)

    def backward(self, loss: torch.Tensor, **backward_kwargs: Any) -> None:
        """Backward of the scaled loss; several calls before `step()` accumulate in fp32."""
        self.scale_loss(loss).backward(**backward_kwargs)

    def unscale_(self) -> None:
        """Unscale the gradients in place, check them for inf/nan and clip them; `step()`
        does this itself when it was not called. No host sync."""
        with deferred_interrupt():
            self._unscale()

    def _unscale(self) -> None:
        if self._found_inf is not None:
            raise RuntimeError(
                "unscale_() has already been called since the last step(); call step() next."
            )
        if not self._has_grads:
            raise RuntimeError(
                "no gradients to step on: call backward(loss) (or .backward() on "
                "scale_loss(loss)) before unscale_() or step()."
            )
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = unscale_and_check_(grads, 1.0 / self.scaler.scale)
        if found_inf is None:
            found_inf = torch.zeros(1, device=params[0].device if params else "cpu")
        self._all_reduce_overflow(found_inf)
        self.telemetry.record_(found_inf, self.scaler.scale, lambda: grads)
        if self.clip is not None:
            # leaves an overflowing step's grads as they were, for last_overflow
            self.last_grad_norm = forensics.clip_grad_norm_if_finite_(params, self.clip)
        self._found_inf = found_inf

    def step(self, closure: Callable[[], float] | None = None) -> bool:  # type: ignore[override]
        """Apply the step unless the gradients overflowed; return whether it was applied."""
        if closure is not None:
            raise TypeError(
                "AutocastOptimizer.step() takes no closure: compute the loss, call "
                "backward(loss), then step()."
            )
        with deferred_interrupt():  # stepped and counted together (mixprec.core.interrupts)
            if (
                self._found_inf is None
                and self._has_grads
                and self._can_fuse()
                and self._step_buffers() is not None
            ):
                return self._fused_step()
            if self._found_inf is None:
                self.unscale_()
            assert self._found_inf is not None
            overflow = bool(self._found_inf.item())  # the one host sync of the step
            self._found_inf = None
            self._has_grads = False
            if overflow:  # only now: forensics cost nothing on clean steps
                self._record_overflow()
            else:
                try:
                    if self._can_fuse():  # unscaled by unscale_() already
                        with torch.no_grad():
                            step_from_master_grads_(self._fused, self._items())
                        self._stepped_fused()
                    else:
                        (self.optimizer if self._view_step is None else self._view_step).step()
                except BaseException:  # raised inside the inner step: no half-made state
                    self._after_failed_step()
                    raise
            return self._update_scale(overflow)

    def _fused_step(self) -> bool:
        """Check, clip and Adam(W)-step the parameters, the kernel unscaling the gradients."""
        with torch.no_grad():
            overflow = self._run_fused(self._items(), flat=False)
        self._has_grads = False
        if overflow:
            self._record_overflow()
        return self._update_scale(overflow)

    def _items(self) -> list[list[FusedItem]]:
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

    def _record_overflow(self) -> None:
        """`last_overflow` of this skipped step: the faulty gradients and weights."""
        report = forensics.overflow_report(
            self._named_grads(), self.scaler.steps, self.scaler.scale
        )
        weights = forensics.weight_faults((name, p, None) for name, p in self._named_params())
        self.last_overflow = dataclasses.replace(report, weights=weights)

    def _after_failed_step(self) -> None:
        """After an exception inside the inner step: no half-made lazy state survives and
        the next backward starts a new step."""
        drop_incomplete_state_(self.optimizer)
        if self._fused is not None:
            self._fused.invalidate()
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of the current step."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._has_grads = False
        self._found_inf = None

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
            self.optimizer.load_state_dict(state_dict["optimizer"])
            self.scaler.load_state_dict(state_dict["scaler"])
            if self._fused is not None:
                self._fused.invalidate()
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
        if self._has_grads or self._found_inf is not None:
            raise RuntimeError(
                "remove_params() between backward() and step(): call step() or zero_grad() "
                "first."
            )
        with deferred_interrupt():
            remove_params_(self.optimizer, params)  # checks them first
            for p in params:
                self.param_names.pop(p, None)
            self._buffers = None
            if self._fused is not None:
                self._fused.invalidate()

    def __repr__(self) -> str:
        return (
            f"AutocastOptimizer({self.optimizer.__class__.__name__}, scaler={self.scaler!r}, "
            f"dtype={self.dtype}, device_type={self.device_type!r}, clip={self.clip}, "
            f"fused={self.fused})"
        )


def _check_fp32(params: Iterable[torch.Tensor]) -> None:
    half = sorted({str(p.dtype) for p in params if p.dtype in HALF_DTYPES})
    if half:
        raise ValueError(
            f"mode='autocast' trains an fp32 model, but the optimizer holds {', '.join(half)} "
            "parameters. Keep the model in fp32 (model_to_float(model)), or train the half "
            "model with MixedPrecisionOptimizer (mode='master')."
        )
