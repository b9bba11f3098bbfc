"""`OptimizerWrapper`: the torch.optim.Optimizer surface both mixprec engines share."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.optim.optimizer as optim_module

from mixprec.core.scaler import LossScaler

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

    Subclasses set `self.optimizer` and `self.scaler` and call `enable_step_hooks(self)`
    instead of `Optimizer.__init__`, which would build param groups of their own.
    """

    optimizer: torch.optim.Optimizer
    scaler: LossScaler

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
