"""torch's step hooks (`register_step_pre_hook` / `register_step_post_hook`) on a wrapper."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.optim.optimizer as optim_module

__all__ = ["enable_step_hooks", "step_hooks_registered"]


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
