"""Critical sections: Ctrl-C (SIGINT) held back until a block that must not stop half-way ends.

A training step changes several things that must agree: the inner optimizer steps the fp32
masters, the masters are copied into the half model, the loss scaler counts the step. A
KeyboardInterrupt between two of them would leave a model that no longer holds its masters,
or a step taken but not counted. Inside `deferred_interrupt()` a SIGINT is recorded instead
of raised, and delivered (to the handler that was there before: KeyboardInterrupt by
default) as soon as the block ends::

    with deferred_interrupt():      # a Ctrl-C in here is raised at the end of the block
        optimizer.step()
        copy_masters_to_model()
        scaler.update(overflow)

Only in the main thread (where Python runs signal handlers), and only when the current
SIGINT handler is Python's default or another Python callable: a handler set to SIG_IGN or
SIG_DFL is left alone. Nested blocks are one section, delivered when the outermost ends. A
block costs two handler swaps (about a microsecond), nothing per parameter.

`atomic_region(cm)` does the same for the two halves of a context manager that changes global
state (`torch.autocast`, whose `__enter__` and `__exit__` are several Python calls): a Ctrl-C
while it is entered leaves it again before being raised, so the state is never left changed.
"""

from __future__ import annotations

import signal
import threading

# Handlers are swapped through signal's C core: `signal.signal` and `signal.getsignal` look
# the handler up in an enum, which raises and catches a ValueError for any Python callable
# (about 6 us a call, 20 us a step, against 0.3 us).
try:
    import _signal as _handlers
except ImportError:
    _handlers = signal
from contextlib import AbstractContextManager
from types import FrameType, TracebackType
from typing import Any

__all__ = ["atomic_region", "deferred_interrupt", "in_critical_section"]

_active = 0  # nesting depth of the sections open in the main thread


class _Deferred:
    __slots__ = ("_frames", "_on", "_previous")

    def __init__(self) -> None:
        self._on = False
        self._previous: Any = None
        self._frames: list[FrameType | None] = []

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._frames.append(frame)

    def __enter__(self) -> _Deferred:
        global _active
        if _active or threading.current_thread() is not threading.main_thread():
            return self
        previous = _handlers.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler and not callable(previous):
            return self  # SIG_IGN / SIG_DFL / None (not set from Python): not ours to change
        self._previous = previous
        _handlers.signal(signal.SIGINT, self._hold)
        self._on = True
        _active += 1
        return self

    @property
    def held(self) -> bool:
        """Whether a SIGINT was held back in this block (and will be delivered at its end)."""
        return bool(self._frames)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _active
        if not self._on:
            return
        _active -= 1
        self._on = False
        _handlers.signal(signal.SIGINT, self._previous)
        if self._frames:  # delivered now, once, to the handler the user had
            frame = self._frames[0]
            self._frames = []
            self._previous(signal.SIGINT, frame)


def deferred_interrupt() -> _Deferred:
    """A context manager within which SIGINT is held back and delivered when it ends."""
    return _Deferred()


class _AtomicRegion:
    __slots__ = ("_entered", "_inner")

    def __init__(self, inner: AbstractContextManager) -> None:
        self._inner = inner
        self._entered = False

    def _leave(self, *exc: Any) -> Any:
        if not self._entered:
            return None
        self._entered = False
        return self._inner.__exit__(*exc)

    def __enter__(self) -> Any:
        try:
            with deferred_interrupt() as section:
                value = self._inner.__enter__()
                self._entered = True
                if section.held:  # raised when the section ends: leave before, as `with` won't
                    self._leave(None, None, None)
        except BaseException:
            self._leave(None, None, None)
            raise
        return value

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        try:
            with deferred_interrupt():
                return self._leave(kind, error, tb)
        finally:
            self._leave(kind, error, tb)  # left already, unless interrupted before the section


def atomic_region(inner: AbstractContextManager) -> AbstractContextManager:
    """`inner`, entered and left in critical sections: a SIGINT while it is being entered
    leaves it again and is then raised; one while it is being left is raised once it is left."""
    return _AtomicRegion(inner)


def in_critical_section() -> bool:
    """Whether a `deferred_interrupt()` block is open in the main thread."""
    return _active > 0
