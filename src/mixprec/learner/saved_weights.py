"""The weights in a Learner checkpoint: once, in fp32, under the model's own names.

Under mixed precision the model holds rounded half weights and the optimizer the exact fp32
masters. A checkpoint's `"model"` entry holds the masters in place of the parameters they
belong to (buffers as they are), so `fp32_model.load_state_dict(checkpoint["model"])` takes
it unchanged, and the optimizer part holds no second copy: on loading, the masters are
rebuilt from the `"model"` entry (`masters_from_entry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mixprec.core.master import masters_from_values
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["master_views", "masters_from_entry", "model_entry"]


def master_views(opt: MixedPrecisionOptimizer) -> dict[int, torch.Tensor]:
    """Per model parameter (by id), its master: the tensor, its view of the flat master, or a
    rebuilt copy of a split one."""
    return opt.master_values()


def model_entry(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """`model.state_dict()` with each parameter that has an fp32 master replaced by that
    master (references: flat masters' views share their one storage, saved once)."""
    state = model.state_dict(keep_vars=True)
    views = master_views(opt) if isinstance(opt, MixedPrecisionOptimizer) else {}
    entry = type(state)()
    entry._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    for name, value in state.items():
        master = views.get(id(value))
        entry[name] = master if master is not None else value.detach()
    return entry


def masters_from_entry(
    entry: Mapping[str, Any], model: nn.Module, opt: MixedPrecisionOptimizer
) -> list[list[torch.Tensor]]:
    """The masters of `opt`, per group, as a checkpoint's `"model"` entry holds them (fp32,
    by parameter name); flat groups concatenated. The entry's keys and shapes must already
    have been checked against `model`."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    values = [[entry[names[id(p)]] for p in params] for params in opt.model_params]
    return masters_from_values(opt.model_params, values, opt.flat_master)
