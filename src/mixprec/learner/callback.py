"""Callbacks: the ten training-loop events, a `Callback` base whose events do nothing, and the
`CallbackHandler` that runs them in order."""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import torch

__all__ = ["EVENTS", "Callback", "CallbackHandler", "LearnerLike"]

LearnerLike = Any
"""The `Learner` a callback is given. Typed loosely: the Learner's module imports the
callbacks it adds (`MixedPrecision`), so they cannot import it back."""

EVENTS: tuple[str, ...] = (
    "on_train_begin",
    "on_epoch_begin",
    "on_batch_begin",
    "on_loss_begin",
    "on_backward_begin",
    "on_backward_end",
    "on_step_end",
    "on_batch_end",
    "on_epoch_end",
    "on_train_end",
)
"""The events of `Learner.fit`, in the order they first fire."""

# Events whose non-None return value replaces a piece of the state, and the key it replaces.
_REPLACES: dict[str, str] = {
    "on_batch_begin": "batch",
    "on_loss_begin": "last_output",
    "on_backward_begin": "last_loss",
}

_STOPS = ("on_batch_end", "on_epoch_end")  # events whose True return value stops training

# The (callback, event) pairs running now, over every handler: a callback that calls
# `learn.validate()` from an event is not run again for that event by the validation inside.
_RUNNING: ContextVar[frozenset[tuple[int, str]]] = ContextVar("_RUNNING", default=frozenset())


class Callback:
    """Base class for the hooks of `Learner.fit`; every event is a no-op by default.

    Each event receives the training state as keyword arguments (see `CallbackHandler`), so
    an override names what it needs and takes `**kwargs` for the rest. Callbacks run in
    ascending `order` (ties keep their insertion order).
    """

    order: int = 0

    def on_train_begin(self, **kwargs: Any) -> None:
        """Before the first epoch of `fit`."""

    def on_epoch_begin(self, **kwargs: Any) -> None:
        """At the start of each epoch."""

    def on_batch_begin(
        self, last_input: Any, last_target: Any, **kwargs: Any
    ) -> tuple[Any, Any] | None:
        """Before the forward pass; return `(input, target)` to replace the batch."""

    def on_loss_begin(self, last_output: Any, **kwargs: Any) -> Any | None:
        """After the forward pass; return a value to replace the output given to the loss."""

    def on_backward_begin(self, last_loss: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        """Before the backward pass; return a tensor to replace the loss that is backpropagated."""

    def on_backward_end(self, **kwargs: Any) -> None:
        """After the backward pass, before the optimizer step."""

    def on_step_end(self, **kwargs: Any) -> None:
        """After the optimizer step (`step_applied` says whether it changed the weights)."""

    def on_batch_end(self, **kwargs: Any) -> bool | None:
        """After each optimizer step; return True to stop training (this epoch is still
        validated and ended)."""

    def on_epoch_end(self, **kwargs: Any) -> bool | None:
        """At the end of each epoch, after validation (`last_metrics`: `[valid_loss, *metrics]`);
        return True to stop training."""

    def on_train_end(self, **kwargs: Any) -> None:
        """After training, also when it stopped on an exception (`exception` holds it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


class CallbackHandler:
    """Runs the events of a list of callbacks in `order`, over one shared state dict.

    The state holds what the loop knows: `learn`, `n_epochs`, `epoch`, `iteration` (steps
    trained so far), `num_batch` (batch index in the epoch), `train`, `last_input`,
    `last_target`, `last_output`, `last_loss`, `step_applied`, `last_metrics`, `pbar` and,
    at `on_train_end`, `exception`. `on_train_end` runs on every callback even if one raises,
    KeyboardInterrupt included (the first error is raised after). `on_batch_end` and
    `on_epoch_end` return True if any callback returned True (fastai v1's way to stop
    training). A callback's non-None return value from `on_batch_begin`
    (an `(input, target)` pair), `on_loss_begin` or `on_backward_begin` replaces the batch,
    the output or the loss for the callbacks after it and for the loop.

    `last_loss` is always the loss function's value: what `on_backward_begin` returns (the
    scaled loss, under mixed precision) goes to `backward()` only, and later events see the
    unscaled loss again.

    A callback's event is never re-entered: when a callback calls `learn.validate()` (or
    `predict()`) from one of its events, the evaluation inside runs every other callback's
    events but skips that callback's running event (which would call validate() again).
    """

    def __init__(self, callbacks: Iterable[Callback], **state: Any) -> None:
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be Callback instances; got {cb!r} ({type(cb).__name__}). "
                    "Subclass mixprec.Callback and pass an instance."
                )
        self.callbacks: list[Callback] = sorted(callbacks, key=lambda cb: cb.order)
        self.state: dict[str, Any] = dict(state)

    def __call__(self, event: str, **updates: Any) -> Any:
        """Update the state with `updates`, run `event` on every callback; return the batch,
        output or loss for the replacing events (None for the others)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; the events are {', '.join(EVENTS)}.")
        self.state.update(updates)
        if event == "on_train_end":  # clean-up: every callback runs, then the first error
            return self._run_all(event)
        key = _REPLACES.get(event)
        unscaled_loss = self.state.get("last_loss")
        stop = False
        for cb in self.callbacks:
            result = self._run(cb, event)
            if result is not None and key is not None:
                self._replace(cb, event, result)
            elif event in _STOPS and result:
                stop = True  # every callback still sees the event
        if event in _STOPS:
            return stop
        if event == "on_batch_begin":
            return self.state["last_input"], self.state["last_target"]
        if event == "on_backward_begin":
            to_backward = self.state["last_loss"]
            self.state["last_loss"] = unscaled_loss
            return to_backward
        return self.state[key] if key is not None else None

    def _run(self, cb: Callback, event: str) -> Any:
        running = _RUNNING.get()
        if (id(cb), event) in running:  # re-entered through validate()/predict(): skip it
            return None
        token = _RUNNING.set(running | {(id(cb), event)})
        try:
            return getattr(cb, event)(**self.state)
        except Exception as e:
            _name_source(e, f"raised in callback {type(cb).__name__}, event {event}")
            raise
        finally:
            _RUNNING.reset(token)

    def _run_all(self, event: str) -> None:
        error: BaseException | None = None
        for cb in self.callbacks:
            try:
                self._run(cb, event)
            except BaseException as e:  # KeyboardInterrupt too: the others still clean up
                error = error or e
        if error is not None:
            raise error

    def _replace(self, cb: Callback, event: str, result: Any) -> None:
        if event != "on_batch_begin":
            self.state[_REPLACES[event]] = result
            return
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError(
                f"{type(cb).__name__}.on_batch_begin must return None or an (input, target) "
                f"pair; got {type(result).__name__}."
            )
        self.state["last_input"], self.state["last_target"] = result


def _name_source(e: BaseException, note: str) -> None:
    """Record in `e` where it was raised, keeping its type and traceback."""
    if hasattr(e, "add_note"):  # Python >= 3.11
        e.add_note(note)
    elif e.args and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]} ({note})", *e.args[1:])
