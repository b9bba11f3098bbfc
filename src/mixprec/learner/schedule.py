"""fastai v1's one-cycle policy: pure functions for the lr and momentum of each step, and the
`OneCycleScheduler` callback that sets them (`Learner.fit_one_cycle` adds one).

The schedule is a function of the optimizer step index within the fit. A step skipped on an
overflow still advances it (as in fastai v1 and torch's OneCycleLR under GradScaler): the cycle
always ends at the fit's last step, whatever the scaler did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mixprec.learner.callback import Callback

__all__ = [
    "OneCycleScheduler",
    "annealing_cos",
    "get_momentum",
    "one_cycle_lr",
    "one_cycle_mom",
    "set_momentum",
]


def annealing_cos(start: float, end: float, pct: float) -> float:
    """Cosine from `start` (pct 0) to `end` (pct 1), fastai v1's `annealing_cos`."""
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _phases(step: int, total: int, pct_start: float) -> tuple[int, float]:
    """(phase, fraction of it done) of `step` in a cycle of `total` steps."""
    warm = int(total * pct_start)  # fastai v1 rounds the warm-up down
    if step < warm:
        return 0, step / warm
    return 1, (step - warm) / (total - warm)


def one_cycle_lr(
    step: int,
    total: int,
    max_lr: float,
    div: float = 25.0,
    pct_start: float = 0.3,
    final_div: float | None = None,
) -> float:
    """The lr of step `step` (0-based) of `total`: cosine from `max_lr / div` up to `max_lr` over
    the first `int(total * pct_start)` steps, then cosine down to `max_lr / final_div`
    (default `div * 1e4`, fastai v1's)."""
    final_div = div * 1e4 if final_div is None else final_div
    phase, pct = _phases(step, total, pct_start)
    if phase == 0:
        return annealing_cos(max_lr / div, max_lr, pct)
    return annealing_cos(max_lr, max_lr / final_div, pct)


def one_cycle_mom(
    step: int, total: int, moms: tuple[float, float] = (0.95, 0.85), pct_start: float = 0.3
) -> float:
    """The momentum of step `step` of `total`: cosine from `moms[0]` down to `moms[1]` while the
    lr warms up, then back up to `moms[0]`."""
    phase, pct = _phases(step, total, pct_start)
    if phase == 0:
        return annealing_cos(moms[0], moms[1], pct)
    return annealing_cos(moms[1], moms[0], pct)


def get_momentum(group: dict[str, Any]) -> float | None:
    """A param group's momentum: Adam's beta1, or SGD's (and RMSprop's) momentum; None if none."""
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None


def set_momentum(group: dict[str, Any], mom: float) -> None:
    """Set a param group's momentum (Adam's beta1, SGD's momentum); a no-op if it has none."""
    if "betas" in group:
        group["betas"] = (mom, *tuple(group["betas"])[1:])
    elif "momentum" in group:
        group["momentum"] = mom


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group of `optimizer` to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def positive_number(name: str, value: Any) -> float:
    """`value` as a float if it is a positive finite number, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    return float(value)


class OneCycleScheduler(Callback):
    """Sets every param group's lr (and momentum, unless `moms` is None) before each optimizer
    step of the fit, following `one_cycle_lr` / `one_cycle_mom` over `total` steps; puts the
    momentum back as it found it when the fit ends."""

    order = -20  # before the other callbacks, so they see this step's lr

    def __init__(
        self,
        max_lr: float,
        total: int,
        *,
        div: float = 25.0,
        pct_start: float = 0.3,
        final_div: float | None = None,
        moms: Sequence[float] | None = (0.95, 0.85),
    ) -> None:
        self.max_lr = positive_number("max_lr", max_lr)
        self.div = positive_number("div", div)
        self.final_div = None if final_div is None else positive_number("final_div", final_div)
        if isinstance(pct_start, bool) or not isinstance(pct_start, (int, float)):
            raise ValueError(f"pct_start must be a number in [0, 1); got {pct_start!r}.")
        if not 0 <= pct_start < 1:
            raise ValueError(f"pct_start must be a number in [0, 1); got {pct_start!r}.")
        self.pct_start = float(pct_start)
        if moms is not None:
            moms = tuple(moms)
            if len(moms) != 2 or not all(0 <= float(m) < 1 for m in moms):
                raise ValueError(
                    f"moms must be None or a pair (high, low) of momentums in [0, 1); got {moms!r}."
                )
            moms = (float(moms[0]), float(moms[1]))
        self.moms = moms
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a number of steps >= 1; got {total!r}.")
        self.total = total
        self._start = 0
        self._saved_moms: list[float | None] = []

    def lr(self, step: int) -> float:
        """The lr of step `step` of this cycle."""
        return one_cycle_lr(step, self.total, self.max_lr, self.div, self.pct_start, self.final_div)

    def on_train_begin(self, learn: Any, iteration: int = 0, **kwargs: Any) -> None:
        """Note where the cycle starts and the momentum to put back at the end."""
        self._start = learn.iteration
        self._saved_moms = [get_momentum(g) for g in learn.opt.param_groups]
        self._apply(learn.opt, 0)

    def on_batch_begin(self, learn: Any, iteration: int, train: bool, **kwargs: Any) -> None:
        """Set the lr and momentum of the step this (micro-)batch belongs to."""
        if train:  # not validate()'s batches
            self._apply(learn.opt, min(iteration - self._start, self.total - 1))

    def on_train_end(self, learn: Any, **kwargs: Any) -> None:
        """Put the momentum back (the lr stays at the cycle's last value, as in fastai v1)."""
        if learn.opt is not None and self.moms is not None:
            for group, mom in zip(learn.opt.param_groups, self._saved_moms):
                if mom is not None:
                    set_momentum(group, mom)

    def _apply(self, opt: torch.optim.Optimizer, step: int) -> None:
        lr = self.lr(step)
        mom = (
            None
            if self.moms is None
            else one_cycle_mom(step, self.total, self.moms, self.pct_start)
        )
        for group in opt.param_groups:
            group["lr"] = lr
            if mom is not None:
                set_momentum(group, mom)

    def __repr__(self) -> str:
        return (
            f"OneCycleScheduler(max_lr={self.max_lr}, total={self.total}, div={self.div}, "
            f"pct_start={self.pct_start}, final_div={self.final_div}, moms={self.moms})"
        )
