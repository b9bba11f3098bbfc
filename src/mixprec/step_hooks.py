"""torch's optimizer step hooks for the wrappers, which do not run `Optimizer.__init__`."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["enable_step_hooks"]


def enable_step_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Make `register_step_pre_hook` / `register_step_post_hook` work on `optimizer` as on
    any torch optimizer: the hooks run around every `step()` call, applied or skipped."""
    optimizer._optimizer_step_pre_hooks = OrderedDict()  # weakly referenced by the handles
    optimizer._optimizer_step_post_hooks = OrderedDict()
    optimizer._patch_step_function()  # wraps the class's step with torch's hook runner
