"""Callbacks that watch a validation value each epoch, as fastai v1's trackers do:
`SaveModelCallback` (a checkpoint of the best epoch, or of every epoch) and
`EarlyStoppingCallback` (stop once the value stops improving)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from mixprec.learner.callback import Callback, LearnerLike

__all__ = ["EarlyStoppingCallback", "SaveModelCallback", "TrackerCallback", "metric_names"]

Mode = Literal["auto", "min", "max"]


def metric_names(metrics: Sequence[Any]) -> list[str]:
    """The names of `validate()`'s values: "valid_loss", then each metric's `__name__` (its
    class name for a callable object)."""
    names = ["valid_loss"]
    for m in metrics:
        names.append(getattr(m, "__name__", type(m).__name__))
    return names


class TrackerCallback(Callback):
    """Follows `monitor` ("valid_loss" or a metric's name) in `last_metrics` at each epoch end;
    `mode` "min", "max" or "auto" (min for a name holding "loss", else max). `improved(value)`
    says whether `value` beats the best by more than `min_delta`, and records it if so."""

    order = 60  # after the Recorder and most callbacks, before MixedPrecision (99)
    active = True  # False during lr_find's sweep (no validation): every event is a no-op

    def __init__(self, monitor: str = "valid_loss", mode: Mode = "auto", min_delta: float = 0.0):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max'; got {mode!r}.")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"monitor must be a metric name such as 'valid_loss'; got {monitor!r}."
            )
        self.monitor = monitor
        self.mode = ("min" if "loss" in monitor else "max") if mode == "auto" else mode
        self.min_delta = abs(float(min_delta))
        self.best: float | None = None

    def on_train_begin(self, learn: LearnerLike, lr_find: bool = False, **kwargs: Any) -> None:
        """Check that `monitor` names a value `validate()` returns; start afresh. Sits out
        lr_find's sweep."""
        self.active = not lr_find
        if not self.active:
            return
        names = metric_names(learn.metrics)
        if self.monitor not in names:
            raise ValueError(
                f"{type(self).__name__} monitors {self.monitor!r}, which validate() does not "
                f"return; it returns {names}. Pass monitor= one of those."
            )
        if learn.data.valid_dl is None:
            raise ValueError(
                f"{type(self).__name__} watches a validation value, but there is no "
                "validation data: build the DataBunch with a valid_dl."
            )
        self._index = names.index(self.monitor)
        self.best = None

    def value(self, last_metrics: Sequence[float] | None) -> float | None:
        """The monitored value in `last_metrics` (None if there are none)."""
        return None if not last_metrics else float(last_metrics[self._index])

    def improved(self, value: float | None) -> bool:
        """Whether `value` beats the best so far by more than `min_delta` (the first does);
        records it as the best if so."""
        if value is None or not math.isfinite(value):
            return False
        better = (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better:
            self.best = value
        return better


class SaveModelCallback(TrackerCallback):
    """`learn.save(name)` at each epoch end where `monitor` improved (`every="improvement"`),
    or `learn.save(f"{name}_{epoch}")` after every epoch (`every="epoch"`). With
    `load_best` (improvement only) the best checkpoint is loaded when training ends normally,
    so the learner holds the best epoch's model, optimizer, history and counts."""

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: Mode = "auto",
        every: Literal["improvement", "epoch"] = "improvement",
        name: str = "bestmodel",
        min_delta: float = 0.0,
        load_best: bool = True,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        if every not in ("improvement", "epoch"):
            raise ValueError(f"every must be 'improvement' or 'epoch'; got {every!r}.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}.")
        self.every, self.name, self.load_best = every, name, bool(load_best)
        self.saved: list[str] = []  # names written in this fit, in order

    def on_train_begin(self, learn: LearnerLike, lr_find: bool = False, **kwargs: Any) -> None:
        """Check the monitored name (not needed to save every epoch); start afresh."""
        if self.every == "improvement":
            super().on_train_begin(learn, lr_find=lr_find, **kwargs)
        else:
            self.active = not lr_find
        if self.active:
            self.saved = []

    def on_epoch_end(
        self, learn: LearnerLike, epoch: int, last_metrics: Sequence[float] | None = None, **kwargs
    ) -> None:
        """Save this epoch if it is the best so far (or every epoch)."""
        if not self.active:
            return
        if self.every == "epoch":
            name = f"{self.name}_{epoch}"
        elif self.improved(self.value(last_metrics)):
            name = self.name
        else:
            return
        learn.save(name)  # under torchrun every rank calls it, rank 0 writes
        self.saved.append(name)

    def on_train_end(self, learn: LearnerLike, exception: BaseException | None = None, **kwargs):
        """Load the best checkpoint, if asked and training ended normally."""
        if not self.active:
            return
        if exception is None and self.every == "improvement" and self.load_best and self.saved:
            learn.load(self.name)


class EarlyStoppingCallback(TrackerCallback):
    """Stops training (at the epoch end) once `monitor` has not improved by more than
    `min_delta` for `patience` epochs in a row."""

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: Mode = "auto",
        min_delta: float = 0.0,
        patience: int = 0,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0; got {patience!r}.")
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_train_begin(self, learn: LearnerLike, **kwargs: Any) -> None:
        """Start afresh (not for lr_find's sweep, which it sits out)."""
        super().on_train_begin(learn, **kwargs)
        if self.active:
            self.wait, self.stopped_epoch = 0, None

    def on_epoch_end(
        self, epoch: int, last_metrics: Sequence[float] | None = None, **kwargs: Any
    ) -> bool:
        """Return True (stop) after `patience` epochs in a row without improvement."""
        if not self.active:
            return False
        if self.improved(self.value(last_metrics)):
            self.wait = 0
            return False
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            return True
        return False
