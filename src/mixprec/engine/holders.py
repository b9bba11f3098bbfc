"""Which optimizer wrapper holds which model parameters: two wrappers stepping one parameter
would overwrite each other's update, so a second one is refused until the first lets go."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch

from mixprec.core.master import ParamGroups

__all__ = ["check_not_held", "hold", "let_go"]

# Every live wrapper that holds model parameters (anything with `model_params`).
_HOLDERS: weakref.WeakSet[Any] = weakref.WeakSet()


def hold(wrapper: Any) -> None:
    """Record that `wrapper` holds its `model_params`."""
    _HOLDERS.add(wrapper)


def let_go(wrapper: Any) -> None:
    """Record that `wrapper` no longer holds its parameters."""
    _HOLDERS.discard(wrapper)


def _held_by_others(ids: set[int]) -> list[torch.Tensor]:
    for other in list(_HOLDERS):
        shared = [p for group in other.model_params for p in group if id(p) in ids]
        if shared:
            return shared
    return []


def check_not_held(model_params: ParamGroups) -> None:
    """Raise a ValueError if another live MixedPrecisionOptimizer holds one of the parameters."""
    ids = {id(p) for group in model_params for p in group}
    if _held_by_others(ids):
        gc.collect()  # a dropped wrapper may live on in a reference cycle until collected
        shared = _held_by_others(ids)
        if shared:
            shapes = ", ".join(str(tuple(p.shape)) for p in shared[:4])
            raise ValueError(
                f"{len(shared)} of these parameters (shapes {shapes}"
                f"{', ...' if len(shared) > 4 else ''}) are already held by another "
                "MixedPrecisionOptimizer: both would step them and overwrite each other's "
                "update. Use one wrapper per parameter (one optimizer with several param "
                "groups), or call release() on the other first."
            )
