"""Fault injection into the Learner: a user callback raising at any event of a batch,
KeyboardInterrupt mid-epoch (from the data, the loss function or a callback), inf/nan
gradients, and a disk that fills up during a checkpoint save, each checked against the run
that should result.

Two changes a user may make mid-training, beside the run that should result: `learn.validate()`
called from a callback inside `fit` (the run without it), and a module of the model replaced
between fits (the run that writes the new module's values into the old one's parameters and
drops their optimizer state).

A stopped `fit` must leave a consistent learner: the half model equal to its rounded fp32
masters, `learn.iteration` equal to the steps the optimizer took, the input transform
removed, and nothing half-done, so that fitting on gives bit for bit what a run that took
the same steps without stopping gives. A step whose gradients hold inf/nan must be
skipped and change nothing: with a static scale the run equals one without that batch.
"""

from __future__ import annotations

import _thread
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import mixprec.core.checkpoint as checkpoint_files
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.callback import EVENTS, Callback
from mixprec.learner.data import DataBunch
from mixprec.learner.learner import Learner

__all__ = [
    "BATCH_EVENTS",
    "IN_STEP",
    "TRAIN_END",
    "LearnerConfig",
    "LearnerResult",
    "Stop",
    "WHERE",
    "run_disk_full",
    "run_grad_faults",
    "run_reentrant_validate",
    "run_replaced_module",
    "run_stop",
]

BATCH_EVENTS = EVENTS[EVENTS.index("on_batch_begin") : EVENTS.index("on_batch_end") + 1]
WHERE = (*BATCH_EVENTS, "data", "loss")  # where a stop can come from
_AFTER_STEP = ("on_step_end", "on_batch_end")
IN_STEP = "optimizer step"  # SIGINT sent from inside the step, between update and copy back
TRAIN_END = "on_train_end"  # KeyboardInterrupt from one callback's on_train_end
N_BATCHES = 4


@dataclass(frozen=True)
class LearnerConfig:
    """How the learner under test trains."""

    name: str
    flat_master: bool = False
    fused: bool = False
    loss_scale: float | str = 512.0

    def learner(self, batches: Sequence[Any], head_group: bool = False, **kwargs: Any) -> Learner:
        """The learner; with `head_group`, the last layer a layer group of its own."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
        if head_group:
            kwargs["layer_groups"] = [model[:3], model[3:]]
        learn = Learner(DataBunch(list(batches), device="cpu"), model, progress=False, **kwargs)
        return learn.to_fp16(self.loss_scale, self.flat_master, fused=self.fused)


@dataclass(frozen=True)
class Stop:
    """`error` raised at batch `step` of the first fit, from `where`: a batch event (from a
    callback running before MixedPrecision, or after it if `late`), "data" (the loader) or
    "loss" (the loss function)."""

    step: int
    where: str
    error: type[BaseException] = RuntimeError
    late: bool = False


@dataclass
class LearnerResult:
    """What one run with a fault did, beside its reference."""

    name: str
    faults: int
    skipped: int = 0
    expected_skips: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0 and self.skipped == self.expected_skips


def _batches(n: int = N_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)
    ]


class _Loader:
    """A fixed list of batches; raises `error` once, instead of batch `at`."""

    def __init__(self, batches: Sequence[Any], at: int | None = None, error: type = RuntimeError):
        self.batches, self.at, self.error = list(batches), at, error

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for i, b in enumerate(self.batches):
            if i == self.at:
                self.at = None
                raise self.error(f"stop in the data at batch {i}")
            yield b


class _Raiser(Callback):
    """Raises `stop.error` once, at `stop.where` of batch `stop.step`."""

    def __init__(self, stop: Stop) -> None:
        self.stop, self.armed = stop, True
        self.order = 100 if stop.late else 0
        if stop.where in BATCH_EVENTS:
            setattr(self, stop.where, self._maybe_raise)

    def _maybe_raise(self, iteration: int, **kwargs: Any) -> None:
        if self.armed and iteration == self.stop.step:
            self.armed = False
            raise self.stop.error(f"stop at {self.stop.where}")


def _raising_loss(stop: Stop):
    calls = [0]

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == stop.step + 1:
            raise stop.error("stop in the loss")
        return F.cross_entropy(output, target)

    return loss


def snapshot(learn: Learner) -> dict[str, Any]:
    """Copies of the masters, model, optimizer state, scaler state and step count."""
    opt = learn.opt
    if not isinstance(opt, MixedPrecisionOptimizer):
        raise TypeError(
            f"expected a learner in mixed precision; its optimizer is {type(opt).__name__}."
        )
    return {
        "masters": [m.detach().clone() for g in opt.master_params for m in g],
        "model": [v.clone() for v in learn.model.state_dict().values()],
        "optimizer": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.optimizer.state[m].items()}
            for g in opt.master_params
            for m in g
            if m in opt.optimizer.state
        ],
        "scaler": opt.scaler.state_dict(),
        "iteration": learn.iteration,
    }


def _differing(a: dict[str, Any], b: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    def same(x: Any, y: Any) -> bool:
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    return [k for k in a if k not in skip and not same(a[k], b[k])]


def model_matches_masters(learn: Learner) -> bool:
    """Whether every model parameter holds its fp32 master, rounded to its dtype."""
    opt = learn.opt
    for params, masters in zip(opt.model_params, opt.master_params):
        if not params:
            continue
        views = (
            masters[0].detach().split([p.numel() for p in params])
            if opt.flat_master
            else [m.detach() for m in masters]
        )
        for p, m in zip(params, views):
            if not torch.equal(p.detach(), m.view_as(p).to(p.dtype)):
                return False
    return True


@contextmanager
def _python_sigint() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt (a process started in the background of a
    shell ignores it, and then `_thread.interrupt_main()` would do nothing)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    if main and previous is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if main and previous is not signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


def run_stop(config: LearnerConfig, stop: Stop) -> LearnerResult:
    """Fit with `stop` injected, check the learner it leaves, fit on, and compare with a
    learner that took the same steps without stopping."""
    with _python_sigint():
        return _run_stop(config, stop)


def _run_stop(config: LearnerConfig, stop: Stop) -> LearnerResult:
    batches = _batches()
    name = f"{config.name}: {stop.error.__name__} at {stop.where} of batch {stop.step}"
    result = LearnerResult(name, faults=1)
    kwargs: dict[str, Any] = {}
    if stop.where == "loss":
        kwargs["loss_func"] = _raising_loss(stop)
    if stop.where in BATCH_EVENTS:
        kwargs["callbacks"] = [_Raiser(stop)]
    if stop.where == TRAIN_END:
        kwargs["callbacks"] = [_EndRaiser(stop.error)]
    learn = config.learner(batches, **kwargs)
    if stop.where == "data":
        learn.data = DataBunch(_Loader(batches, stop.step, stop.error), device="cpu")
    if stop.where == IN_STEP:
        _interrupt_inside_step(learn, stop.step)
    try:
        learn.fit(1)
        result.problems.append("fit did not stop")
    except stop.error as error:
        notes = getattr(error, "__notes__", [])
        named = f"raised in callback _Raiser, event {stop.where}" in notes
        if stop.where in BATCH_EVENTS and stop.error is RuntimeError and not named:
            result.problems.append(f"the error does not name its source: {notes}")
    taken = stop.step + (stop.where in (*_AFTER_STEP, IN_STEP))
    if stop.where == TRAIN_END:
        taken = len(batches)
    stopped = snapshot(learn)
    if not model_matches_masters(learn):
        result.problems.append("the model does not hold its masters after the stop")
    if learn.iteration != taken or learn.opt.scaler.steps != taken:
        result.problems.append(
            f"{taken} steps taken, but iteration={learn.iteration}, "
            f"scaler.steps={learn.opt.scaler.steps}"
        )
    if learn.data.tfms:
        result.problems.append("the input transform was left in place")
    learn.data = DataBunch(list(batches), device="cpu")
    learn.fit(1)

    ref = config.learner(batches)
    if taken:
        ref.data = DataBunch(list(batches[:taken]), device="cpu")
        ref.fit(1)
    result.problems += [f"after the stop: {k}" for k in _differing(stopped, snapshot(ref))]
    ref.data = DataBunch(list(batches), device="cpu")
    ref.fit(1)
    differ = _differing(snapshot(learn), snapshot(ref))
    result.problems += [f"fitting on: {k}" for k in differ]
    result.lost = int(bool(differ))
    return result


class _EndRaiser(Callback):
    """Raises once at on_train_end, before MixedPrecision's (which removes the input
    transform)."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error, self.armed = error, True

    def on_train_end(self, **kwargs: Any) -> None:
        if self.armed:
            self.armed = False
            raise self.error("stop at on_train_end")


def _interrupt_inside_step(learn: Learner, at: int) -> None:
    """SIGINT to the main thread from inside step `at`: after the wrapped optimizer (or the
    fused kernels) updated the masters, before they are copied into the model."""
    calls = [0]

    def interrupt(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == at + 1:
            _thread.interrupt_main()

    fused = learn.opt.update.kernel if learn.opt.update.fused else None
    if fused is None:
        learn.opt.optimizer.register_step_post_hook(interrupt)
        return
    update = fused.update_

    def update_then_interrupt(*args: Any, **kwargs: Any) -> None:
        update(*args, **kwargs)
        interrupt()

    fused.update_ = update_then_interrupt


class _Poison(Callback):
    """Writes `value` into one element of a half gradient at the given steps (before
    MixedPrecision moves the gradients to the masters)."""

    order = 0

    def __init__(self, faults: dict[int, tuple[int, int, float]]) -> None:
        self.faults = faults  # step -> (parameter index, element index, value)
        self.reports: dict[int, Any] = {}

    def on_backward_end(self, learn: Learner, iteration: int, **kwargs: Any) -> None:
        if iteration in self.faults:
            param, index, value = self.faults[iteration]
            params = list(learn.model.parameters())
            grad = params[param % len(params)].grad
            with torch.no_grad():
                grad.view(-1)[index % grad.numel()] = value

    def on_step_end(self, learn: Learner, iteration: int, **kwargs: Any) -> None:
        if iteration in self.faults:
            self.reports[iteration] = learn.opt.last_overflow


def run_grad_faults(
    config: LearnerConfig, faults: dict[int, tuple[int, int, float]]
) -> LearnerResult:
    """One epoch with an inf/nan written into a half gradient at each step of `faults`,
    beside one epoch without those batches (`config` must scale statically)."""
    batches = _batches(8)
    poison = _Poison(faults)
    learn = config.learner(batches, callbacks=[poison])
    learn.fit(1)
    ref = config.learner([b for i, b in enumerate(batches) if i not in faults])
    ref.fit(1)
    result = LearnerResult(f"{config.name}: gradient faults at {sorted(faults)}", len(faults))
    result.expected_skips = len(faults)
    result.skipped = learn.recorder.skipped_steps
    differ = _differing(snapshot(learn), snapshot(ref), skip=("scaler", "iteration"))
    result.problems += [f"beside the run without those batches: {k}" for k in differ]
    result.lost = int(bool(differ))
    names = [n for n, _ in learn.model.named_parameters()]
    for step, (param, _, _) in faults.items():
        report = poison.reports.get(step)
        expected = [names[param % len(names)]]
        if report is None or report.names != expected:
            result.problems.append(f"step {step}: report {report} does not name {expected}")
    if learn.recorder.skipped != [i in faults for i in range(len(batches))]:
        result.problems.append(f"the recorder's skipped steps are {learn.recorder.skipped}")
    return result


class _FullDiskFile:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: Any) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


@contextmanager
def _full_disk(room: int) -> Iterator[None]:
    """Within: checkpoint files have `room` bytes of space, then writes fail with ENOSPC."""

    def full_open(path: Any, mode: str) -> _FullDiskFile:
        return _FullDiskFile(open(path, mode), room)  # closed by its __exit__

    checkpoint_files.open = full_open  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del checkpoint_files.open  # type: ignore[attr-defined]


def run_disk_full(config: LearnerConfig, at: int, epochs: int = 3) -> LearnerResult:
    """Fit `epochs` epochs saving a checkpoint after each, the disk full during save `at`
    (>= 1): the save must fail with an OSError (ENOSPC) leaving the previous checkpoint
    intact, and a learner loaded from it and fitted on must match, bit for bit, the run
    that never failed."""
    if not 1 <= at < epochs:
        raise ValueError(f"at must be in [1, {epochs - 1}] (a save before it to keep); got {at}.")
    batches = _batches()
    result = LearnerResult(f"{config.name}: disk full at the save after epoch {at + 1}", 1)
    with tempfile.TemporaryDirectory() as folder:
        learn = config.learner(batches, path=folder)
        for _ in range(at):
            learn.fit(1)
            path = learn.save("ckpt")
        kept = path.read_bytes()
        learn.fit(1)
        try:
            with _full_disk(room=len(kept) // 2):
                learn.save("ckpt")
            result.problems.append("the save on a full disk did not fail")
        except Exception as error:  # any other error is a problem counted, not a crash
            full = isinstance(error, OSError) and error.errno == errno.ENOSPC
            if not full or "the previous file there is intact" not in str(error):
                result.problems.append(f"the save failed with {error!r}")
        if path.read_bytes() != kept:
            result.problems.append("the previous checkpoint changed")
        if sorted(os.listdir(path.parent)) != [path.name]:
            result.problems.append(f"files left: {sorted(os.listdir(path.parent))}")
        resumed = config.learner(batches, path=folder).load("ckpt")
        resumed.fit(epochs - at)
    ref = config.learner(batches)
    ref.fit(epochs)
    differ = _differing(snapshot(resumed), snapshot(ref))
    result.problems += [f"resumed from the previous checkpoint: {k}" for k in differ]

    result.lost = int(bool(differ))
    return result


class _Validator(Callback):
    """Calls `learn.validate(batches)` from `event` at the steps in `steps`, and records
    what of the training state it changed."""

    def __init__(self, event: str, steps: Sequence[int], batches: Sequence[Any]) -> None:
        self.steps, self.batches, self.calls = set(steps), list(batches), 0
        self.changed: list[str] = []
        setattr(self, event, self._validate)

    @staticmethod
    def _state(learn: Learner) -> dict[str, Any]:
        return {
            "train mode": [m.training for m in learn.model.modules()],
            "grad mode": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "input transforms": list(learn.data.tfms),
        }

    def _validate(self, learn: Learner, iteration: int, train: bool = True, **kwargs: Any) -> None:
        if train and iteration in self.steps:
            before = self._state(learn)
            learn.validate(self.batches)
            after = self._state(learn)
            self.changed += [k for k in before if before[k] != after[k]]
            self.calls += 1


def run_reentrant_validate(
    config: LearnerConfig, event: str, steps: Sequence[int]
) -> LearnerResult:
    """Two epochs with `learn.validate()` called from a callback's `event` at `steps`, beside
    two epochs without: the same numbers, bit for bit, and the training state unchanged."""
    batches = _batches()
    validator = _Validator(event, steps, batches[:2])
    learn = config.learner(batches, callbacks=[validator])
    learn.fit(2)
    ref = config.learner(batches)
    ref.fit(2)
    result = LearnerResult(f"{config.name}: validate() at {event} of steps {sorted(steps)}", 0)
    result.faults = validator.calls
    if validator.calls != len(validator.steps):
        result.problems.append(f"validate() ran {validator.calls} times, not {len(steps)}")
    result.problems += [f"validate() changed the {k}" for k in validator.changed]
    differ = _differing(snapshot(learn), snapshot(ref))
    result.problems += [f"beside the run without validate(): {k}" for k in differ]
    result.lost = int(bool(differ))
    return result


def run_replaced_module(config: LearnerConfig, seed: int) -> LearnerResult:
    """An epoch, the head replaced by a new module (initialised from `seed`), an epoch; beside
    a learner (the head a layer group of its own, as the new head's param groups are) whose
    head parameters took the new module's values between the epochs and lost their optimizer
    state: the same numbers, bit for bit."""
    batches = _batches()
    learn = config.learner(batches)
    learn.fit(1)
    torch.manual_seed(seed)
    head = nn.Linear(16, 4)
    values = [p.detach().clone() for p in head.parameters()]
    learn.model[3] = head
    learn.fit(1)
    result = LearnerResult(f"{config.name}: head replaced between fits (seed {seed})", 1)
    held = {id(p) for g in learn.opt.model_params for p in g}
    if held != {id(p) for p in learn.model.parameters()}:
        result.problems.append("the optimizer does not hold exactly the model's parameters")

    ref = config.learner(batches, head_group=True)
    ref.fit(1)
    opt = ref.opt
    old = list(ref.model[3].parameters())
    opt.load_master_values_({id(p): v for p, v in zip(old, values)})
    with torch.no_grad():
        for params, masters in zip(opt.model_params, opt.master_params):
            if params and all(any(p is q for q in old) for p in params):
                for m in masters:
                    opt.optimizer.state.pop(m, None)
        values_now = opt.master_values()
        for p in old:
            p.copy_(values_now[id(p)].to(p.dtype))
    opt.update.invalidate()  # its plan holds the dropped state
    ref.fit(1)
    differ = _differing(snapshot(learn), snapshot(ref))
    result.problems += [f"beside the learner given the new values: {k}" for k in differ]
    result.lost = int(bool(differ))
    return result
