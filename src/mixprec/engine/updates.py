"""The update strategies of a step, behind one small interface, chosen once at construction.

- `OwnStep`: the wrapped optimizer's own `step()` on the fp32 gradients (large element-wise
  steps through cache-sized views, `mixprec.engine.view_step`), then the copy to the model.
- `FusedStep`: torch's fused Adam(W) kernel (`mixprec.engine.fused_adam`), which reads the half
  gradients, unscales them in the kernel and rounds the new masters into the model while they
  are in cache; fp32 and split masters alike. Chosen automatically (`fused=None`), it gives way
  to `OwnStep` while step hooks wait for the wrapped optimizer's own `step()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mixprec.engine.fused_adam import (
    FusedAdamStep,
    fused_device_supported,
    fused_unsupported_reason,
    step_from_master_grads_,
)
from mixprec.engine.fused_items import FusedItem
from mixprec.engine.step_hooks import step_hooks_registered
from mixprec.engine.view_step import ViewStep

__all__ = ["FusedStep", "OwnStep", "Update", "choose_update"]

Items = Callable[[], Sequence[Sequence[FusedItem]]]


class Update:
    """How a step's update runs; `now()` says which strategy serves the current step."""

    fused = False  # runs torch's fused Adam(W) kernel
    reads_half_grads = False  # can step straight from the half gradients (no fp32 copy kept)

    def now(self, optimizer: torch.optim.Optimizer, device: torch.device) -> Update:
        """The strategy for this step."""
        return self

    def apply(self, fp32_items: Items, copy_to_model: Callable[[], None]) -> None:
        """Step from the unscaled (and clipped) fp32 gradients and round into the model."""
        raise NotImplementedError

    def invalidate(self) -> None:
        """Forget cached plans (after a load, a failed step or new parameters)."""


class OwnStep(Update):
    """The wrapped optimizer's own `step()`, large element-wise steps view by view."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.views = ViewStep(optimizer) if ViewStep.supported(optimizer) else None

    def apply(self, fp32_items: Items, copy_to_model: Callable[[], None]) -> None:
        (self.optimizer if self.views is None else self.views).step()
        copy_to_model()


class FusedStep(Update):
    """torch's fused Adam(W) kernel, from half or fp32 gradients, chunk by chunk in cache."""

    fused = True
    reads_half_grads = True

    def __init__(
        self, optimizer: torch.optim.Optimizer, own: OwnStep | None, auto: bool = False
    ) -> None:
        self.kernel = FusedAdamStep(optimizer)  # validates the optimizer
        self.own = own  # what serves a device without fused kernels; None: always fused
        self.auto = auto  # chosen automatically: gives way to step hooks

    def now(self, optimizer: torch.optim.Optimizer, device: torch.device) -> Update:
        if self.own is None:
            return self
        if (self.auto and step_hooks_registered(optimizer)) or not fused_device_supported(device):
            return self.own
        return self

    def apply(self, fp32_items: Items, copy_to_model: Callable[[], None]) -> None:
        step_from_master_grads_(self.kernel, fp32_items())

    def fused_step(
        self,
        items: Sequence[Sequence[FusedItem]],
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scale: float,
        clip: float | None,
        flat: bool,
        checked: Callable[[torch.Tensor], None],
    ) -> tuple[bool, torch.Tensor | None]:
        """The one-pass step: (overflowed, unscaled gradient norm or None)."""
        return self.kernel.step(items, buffers, scale, clip, flat, checked)

    def invalidate(self) -> None:
        self.kernel.invalidate()


def choose_update(
    optimizer: torch.optim.Optimizer, fused: bool | None, *, split: bool = False
) -> Update:
    """The update for `optimizer`: fused when asked (`True`), when possible (`None`: exactly
    Adam/AdamW), and always for split masters; else its own step."""
    auto = fused is None and not split
    if auto:
        fused = fused_unsupported_reason(optimizer) is None
    if not (fused or split):
        return OwnStep(optimizer)
    return FusedStep(optimizer, None if split else OwnStep(optimizer), auto)
