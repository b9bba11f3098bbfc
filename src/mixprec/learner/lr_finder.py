"""The learning-rate finder: an exponential lr sweep (`LRFinder`, a callback), the suggestion
drawn from its losses, its plot, and the snapshot that puts the learner back as it was
(`Learner.lr_find` runs all three)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixprec.core.checkpoint import loader_generators, rng_state, set_rng_state
from mixprec.core.figures import save_figure
from mixprec.learner.callback import Callback, LearnerLike
from mixprec.learner.schedule import positive_number, set_lr

__all__ = ["LRFinder", "LRFinderResult", "LearnerSnapshot", "suggest_lr"]


def _clone(obj: Any) -> Any:
    """A deep copy of the tensors of a nested state (dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class LearnerSnapshot:
    """Everything a fit changes in a learner, copied in memory: model (parameters, buffers,
    train mode), optimizer (masters, state, lrs and scaler), epoch and step counts, recorder
    history and random state; `restore()` puts it back bit for bit."""

    def __init__(self, learn: LearnerLike) -> None:
        self.learn = learn
        self.model = _clone(learn.model.state_dict())
        self.training = learn.model.training
        self.opt = learn.opt
        self.opt_state = None if learn.opt is None else _clone(learn.opt.state_dict())
        self.epoch, self.iteration = learn.epoch, learn.iteration
        self.recorder = _clone(learn.recorder.state_dict())
        self.rng = rng_state(loader_generators(learn.data.train_dl.dl))

    def restore(self) -> None:
        """Put the learner back as it was when the snapshot was taken."""
        learn = self.learn
        if self.opt_state is not None:
            learn.opt = self.opt
            learn.opt.load_state_dict(self.opt_state)  # masters -> model, under mixed precision
            learn.opt.zero_grad()
        else:
            learn.opt = None  # the next fit builds its optimizer afresh, as it would have
        learn.model.load_state_dict(self.model)
        learn.model.train(self.training)
        for p in learn.model.parameters():
            p.grad = None
        learn.epoch, learn.iteration = self.epoch, self.iteration
        learn.recorder.load_state_dict(self.recorder)
        set_rng_state(self.rng, loader_generators(learn.data.train_dl.dl))


class LRFinder(Callback):
    """Raises the lr exponentially from `start_lr` to `end_lr` over `num_it` optimizer steps
    and records the loss of each; stops training after `num_it` steps or, if `stop_div`, once
    the smoothed loss exceeds 4 times its best (or is not finite), as fastai v1's does."""

    order = -20  # before the other callbacks, so they see this step's lr

    def __init__(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
        beta: float = 0.98,
    ) -> None:
        positive_number("start_lr", start_lr)
        positive_number("end_lr", end_lr)
        if end_lr <= start_lr:
            raise ValueError(f"end_lr must be above start_lr; got {start_lr} and {end_lr}.")
        if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 2:
            raise ValueError(f"num_it must be an integer >= 2; got {num_it!r}.")
        self.start_lr, self.end_lr, self.num_it = float(start_lr), float(end_lr), num_it
        self.stop_div = bool(stop_div)
        self.beta = beta
        self.lrs: list[float] = []
        self.losses: list[float] = []  # smoothed, as plotted
        self.raw_losses: list[float] = []
        self._start = 0
        self._avg = 0.0

    def lr(self, step: int) -> float:
        """The lr of step `step` of the sweep: `start_lr * (end_lr / start_lr) ** (step / (num_it - 1))`."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.num_it - 1))

    def on_train_begin(self, learn: LearnerLike, **kwargs: Any) -> None:
        """Start the sweep at `start_lr`."""
        self._start = learn.iteration
        self.lrs, self.losses, self.raw_losses, self._avg = [], [], [], 0.0
        self._set_lr(learn, 0)

    def on_batch_begin(
        self, learn: LearnerLike, iteration: int, train: bool, **kwargs: Any
    ) -> None:
        """Set the lr of the step this (micro-)batch belongs to."""
        if train:  # not validate()'s batches
            self._set_lr(learn, min(iteration - self._start, self.num_it - 1))

    def on_batch_end(self, learn: LearnerLike, last_loss: torch.Tensor, **kwargs: Any) -> bool:
        """Record the step's lr and loss; return True (stop) when the sweep is over."""
        step = learn.iteration - self._start - 1  # the step just taken (counted already)
        loss = float(last_loss.detach())  # a host sync per step: the stop test needs the value
        self.lrs.append(self.lr(step))
        self.raw_losses.append(loss)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** len(self.raw_losses))
        self.losses.append(smooth)
        best = min(self.losses)
        diverged = not math.isfinite(smooth) or smooth > 4 * best
        return step + 1 >= self.num_it or (self.stop_div and diverged)

    def _set_lr(self, learn: LearnerLike, step: int) -> None:
        set_lr(learn.opt, self.lr(step))

    def result(self) -> LRFinderResult:
        """What the sweep found."""
        return LRFinderResult(list(self.lrs), list(self.losses), list(self.raw_losses))


def suggest_lr(
    lrs: Sequence[float], losses: Sequence[float], skip_start: int = 10, skip_end: int = 5
) -> float | None:
    """The lr where the (smoothed) loss falls fastest against log(lr), leaving out the first
    `skip_start` and last `skip_end` points as fastai v1 does (fewer if the sweep was short);
    None with fewer than 3 points."""
    n = len(losses)
    skip_start, skip_end = min(skip_start, n // 4), min(skip_end, n // 4)
    xs = [math.log(lr) for lr in lrs[skip_start : n - skip_end]]
    ys = list(losses[skip_start : n - skip_end])
    if len(ys) < 3:
        return None
    slopes = [(ys[i + 1] - ys[i - 1]) / (xs[i + 1] - xs[i - 1]) for i in range(1, len(ys) - 1)]
    finite = [(s, i) for i, s in enumerate(slopes, start=1) if math.isfinite(s)]
    if not finite:
        return None
    return lrs[skip_start + min(finite)[1]]


@dataclass
class LRFinderResult:
    """An lr sweep: `lrs`, the smoothed `losses` and the `raw_losses` of each step; `suggestion`
    is where the loss fell fastest (`suggest_lr`), `lr_min` a tenth of the lr of the lowest loss."""

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float] = field(default_factory=list)

    @property
    def suggestion(self) -> float | None:
        """The lr where the smoothed loss fell fastest (None if the sweep was too short)."""
        return suggest_lr(self.lrs, self.losses)

    @property
    def lr_min(self) -> float | None:
        """A tenth of the lr at the lowest smoothed loss (fastai v2's `minimum`)."""
        finite = [(loss, lr) for loss, lr in zip(self.losses, self.lrs) if math.isfinite(loss)]
        return min(finite)[1] / 10 if finite else None

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG of the smoothed loss against the lr (log scale), the suggestion marked.
        Needs matplotlib (`pip install -e '.[plot]'` in the checkout)."""
        try:
            from matplotlib.figure import Figure  # the OO API: no pyplot, no global backend
        except ImportError as e:
            raise ImportError(
                "plotting needs matplotlib: pip install -e '.[plot]' in the checkout "
                "(or pip install matplotlib)."
            ) from e
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        ax.plot(self.lrs, self.losses, lw=1)
        suggestion = self.suggestion
        if suggestion is not None:
            i = self.lrs.index(suggestion)
            ax.plot([suggestion], [self.losses[i]], "o", color="red", label=f"{suggestion:.2e}")
            ax.legend(fontsize="small")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        ax.grid(alpha=0.3)
        return save_figure(fig, path, title)
