"""`OptimizerWrapper`: what both mixprec engines share: the torch.optim.Optimizer surface,
and the fused Adam(W) step around the loss scale (one check, one host sync, one update)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.optim.optimizer as optim_module

from mixprec.core.chunked import step_buffers
from mixprec.core.scaler import LossScaler
from mixprec.engine import forensics
from mixprec.engine.fused_adam import FusedAdamStep, FusedItem, fused_device_supported
from mixprec.engine.telemetry import NoTelemetry, Telemetry
from mixprec.parallel.distributed import all_reduce_overflow_

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["OptimizerWrapper", "enable_step_hooks", "step_hooks_registered"]


def enable_step_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Make `register_step_pre_hook` / `register_step_post_hook` work on `optimizer` as on
    any torch optimizer: the hooks run around every `step()` call, applied or skipped."""
    optimizer._optimizer_step_pre_hooks = OrderedDict()  # weakly referenced by the handles
    optimizer._optimizer_step_post_hooks = OrderedDict()
    optimizer._patch_step_function()  # wraps the class's step with torch's hook runner


def step_hooks_registered(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step pre/post hooks are registered on `optimizer` or on every optimizer:
    they run only in its own `step()` and see its parameters as they are."""
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or optim_module._global_optimizer_pre_hooks
        or optim_module._global_optimizer_post_hooks
    )


class OptimizerWrapper(torch.optim.Optimizer):
    """A loss-scaled wrapper around `self.optimizer`: its param groups, state and defaults are
    the wrapped optimizer's, so lr schedulers (which want a torch Optimizer) drive it.

    Subclasses set `self.optimizer`, `self.scaler` and the attributes below and call
    `enable_step_hooks(self)` instead of `Optimizer.__init__`, which would build param groups
    of their own; they define `_after_failed_step()`.
    """

    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    clip: float | None
    data_parallel: bool
    process_group: ProcessGroup | None
    telemetry: Telemetry | NoTelemetry
    last_grad_norm: torch.Tensor | None
    last_overflow: forensics.OverflowReport | None
    _fused: FusedAdamStep | None  # the fused Adam(W) step, if the optimizer allows it
    _auto_fused: bool  # fused=None: the fused step gives way to step hooks
    _buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    @property
    def fused(self) -> bool:
        """Whether Adam(W) steps run through torch's fused kernel (see the class docstring)."""
        return self._fused is not None

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of overflow, since the start of training."""
        return self.scaler.skipped_steps

    @property
    def loss_scale(self) -> float:
        """The current loss scale."""
        return self.scaler.scale

    # -- the step both engines share ------------------------------------------------------
    def _after_failed_step(self) -> None:
        raise NotImplementedError

    def _device(self) -> torch.device:
        """The device of the first tensor the wrapped optimizer steps (cpu if none)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _step_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(found_inf, inv_scale, scale), reused every step; None if the tensors the wrapped
        optimizer steps span devices."""
        if self._buffers is None:
            self._buffers = step_buffers(
                [p for group in self.optimizer.param_groups for p in group["params"]]
            )
        return self._buffers

    def _can_fuse(self) -> bool:
        """Whether this step runs through torch's fused Adam(W) kernel: asked for, or
        automatic (fused=None) and no step hook waits for the wrapped optimizer's own step
        (only that runs them)."""
        return (
            self._fused is not None
            and not (self._auto_fused and step_hooks_registered(self.optimizer))
            and fused_device_supported(self._device())
        )

    def _stepped_fused(self) -> None:
        # An lr scheduler built on the wrapped optimizer watches for its step() to warn about
        # a scheduler stepped first; the fused kernel updated its params without calling it.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _all_reduce_overflow(self, found_inf: torch.Tensor) -> None:
        if self.data_parallel:
            all_reduce_overflow_(found_inf, self.process_group)

    def _run_fused(self, items: Sequence[Sequence[FusedItem]], flat: bool) -> bool:
        """The fused step of `items` at the current loss scale: check (and clip), the
        overflow flag all-reduced and recorded, one host sync, the update unless a gradient
        overflowed; return whether one did. Call under no_grad() with `_step_buffers()` set."""
        assert self._fused is not None and self._buffers is not None
        scale = self.scaler.scale

        def checked(found_inf: torch.Tensor) -> None:  # after the check, before the one sync
            self._all_reduce_overflow(found_inf)
            grads = lambda: [it.grad for group in items for it in group]  # noqa: E731
            self.telemetry.record_(found_inf, scale, grads, grad_scale=scale)

        try:
            overflow, norm = self._fused.step(items, self._buffers, scale, self.clip, flat, checked)
        except BaseException:  # raised inside the update: no half-made state
            self._after_failed_step()
            raise
        if not overflow:
            self._stepped_fused()
        if norm is not None:
            self.last_grad_norm = norm
        return overflow

    def _update_scale(self, overflow: bool) -> bool:
        """The scaler's update after a step; return whether the step was applied."""
        with forensics.naming_overflow(self.last_overflow if overflow else None):
            self.scaler.update(overflow)  # may raise FloatingPointError; the state is consistent
        return not overflow
