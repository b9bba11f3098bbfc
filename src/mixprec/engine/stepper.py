"""Stepper: one loss, one optimizer with its own loss scale, one LR schedule (e.g. a GAN's halves)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["Stepper"]


class Stepper:
    """Steps one optimizer on one loss and advances its LR scheduler only on applied steps.

    For training with several optimizers and losses, e.g. a GAN, give each its own
    `MixedPrecisionOptimizer` (so each loss is scaled on its own) and its own Stepper::

        d = Stepper(MixedPrecisionOptimizer(AdamW(D.parameters())), StepLR(...))
        g = Stepper(MixedPrecisionOptimizer(AdamW(G.parameters())), StepLR(...))
        for real in data:
            fake = G(noise())
            d.step(d_loss(D(real), D(fake.detach())))   # False: D overflowed and skipped
            g.step(g_loss(D(fake)))                     # G steps whatever D did

    An overflow in one loss skips only its own optimizer: its weights and optimizer state
    stay bit-identical, its scale backs off, its scheduler stays put. `step` first drops
    the gradients that another loss's backward left in this optimizer's parameters (G's
    loss backpropagates through D), then runs the scaled backward and the step.
    An `AutocastOptimizer` works the same way (compute each loss under `opt.autocast()`).
    A plain torch optimizer works too (fp32 training): its steps are always applied.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None = None
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a MixedPrecisionOptimizer (or a torch.optim.Optimizer for "
                f"fp32); got {type(optimizer).__name__}."
            )
        if scheduler is not None:
            if isinstance(scheduler, ReduceLROnPlateau) or not isinstance(scheduler, LRScheduler):
                raise TypeError(
                    "scheduler must be a per-step torch LRScheduler (StepLR, OneCycleLR, ...); "
                    f"got {type(scheduler).__name__}. Step metric-driven schedulers yourself."
                )
            inner = getattr(optimizer, "optimizer", None)
            if scheduler.optimizer is not optimizer and scheduler.optimizer is not inner:
                raise ValueError(
                    f"the scheduler ({type(scheduler).__name__}) schedules another optimizer; "
                    "build it on this Stepper's optimizer."
                )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.applied: bool | None = None  # whether the last step was applied; None before any
        self.steps = 0
        self.applied_steps = 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because this optimizer's gradients overflowed."""
        return self.steps - self.applied_steps

    def step(self, loss: torch.Tensor) -> bool:
        """Backward of `loss` (scaled), step, and the scheduler if applied; return whether
        the step was applied."""
        self.optimizer.zero_grad()  # drop grads another loss's backward left in our params
        if isinstance(self.optimizer, (MixedPrecisionOptimizer, AutocastOptimizer)):
            self.optimizer.backward(loss)
            applied = self.optimizer.step()
        else:
            loss.backward()
            self.optimizer.step()
            applied = True
        self.steps += 1
        self.applied_steps += applied
        if applied and self.scheduler is not None:
            self.scheduler.step()
        self.applied = applied
        return applied

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and the scheduler's state, and the step counts."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "steps": self.steps,
            "applied_steps": self.applied_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` saved; keys added by newer versions are ignored."""
        if not isinstance(state_dict, Mapping) or "optimizer" not in state_dict:
            raise ValueError(
                "expected a Stepper state_dict (a mapping with at least 'optimizer'); got "
                f"{type(state_dict).__name__}."
            )
        saved_scheduler = state_dict.get("scheduler")
        if (saved_scheduler is None) != (self.scheduler is None):
            raise ValueError(
                "the state_dict and this Stepper disagree on having a scheduler; build the "
                "Stepper as the one that was saved."
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved_scheduler)
        self.steps = int(state_dict.get("steps", 0))
        self.applied_steps = int(state_dict.get("applied_steps", 0))
        self.applied = None

    def __repr__(self) -> str:
        scheduler = type(self.scheduler).__name__ if self.scheduler is not None else None
        return (
            f"Stepper({self.optimizer!r}, scheduler={scheduler}, steps={self.steps}, "
            f"skipped_steps={self.skipped_steps})"
        )
