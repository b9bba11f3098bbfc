"""Ctrl-C at any moment of a fit: SIGINT delivered at random times (and at chosen points
inside the optimizer step) leaves a learner that is consistent, and fitting on gives the
numbers of a learner that took the same steps without stopping."""

from __future__ import annotations

import _thread
import gc
import random
import signal
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from helpers.learner import Probe, assert_identical
from mixprec import Callback, DataBunch, Learner, MixedPrecisionOptimizer
from mixprec.core.optim_state import REQUIRED_STATE

N_BATCHES = 4
CONFIGS: dict[str, dict[str, Any] | None] = {
    "master": {"dtype": torch.bfloat16, "fused": False},  # the wrapped optimizer steps
    "flat": {"dtype": torch.bfloat16, "flat_master": True},
    "fused": {"dtype": torch.bfloat16, "fused": True, "loss_scale": "dynamic"},
    "autocast": {"dtype": torch.bfloat16, "mode": "autocast"},
    "fp32": None,
}


def _batches() -> list:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(N_BATCHES)
    ]


BATCHES = _batches()


def _learner(options: dict[str, Any] | None, batches=BATCHES) -> Learner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    data = DataBunch(list(batches), list(batches[:1]), device="cpu")
    learn = Learner(data, model, progress=False)
    return learn if options is None else learn.to_fp16(**options)


def _state(learn: Learner) -> dict[str, Any]:
    opt = learn.opt if learn.opt is not None else learn.create_opt()
    inner = getattr(opt, "optimizer", opt)
    state = {
        "model": {k: v.clone() for k, v in learn.model.state_dict().items()},
        "opt": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[p].items()}
            for g in inner.param_groups
            for p in g["params"]
            if p in inner.state
        ],
    }
    if isinstance(opt, MixedPrecisionOptimizer):
        state["masters"] = [m.detach().clone() for g in opt.master_params for m in g]
    if hasattr(opt, "scaler"):
        state["scaler"] = opt.scaler.state_dict()
    return state


def _problems(learn: Learner) -> list[str]:
    """What is wrong with a learner after an interrupted fit."""
    found = []
    opt = learn.opt if learn.opt is not None else learn.create_opt()  # stopped before it
    if not torch.is_grad_enabled():
        found.append("grad mode left disabled")
    if torch.is_autocast_enabled("cpu"):
        found.append("autocast left enabled")
    if learn.data.tfms:
        found.append("input transform left in place")
    if hasattr(opt, "scaler") and opt.scaler.steps != learn.iteration:
        found.append(f"iteration {learn.iteration} but scaler.steps {opt.scaler.steps}")
    inner = getattr(opt, "optimizer", opt)
    needed = REQUIRED_STATE[type(inner).__name__]
    if any(not needed <= set(st) for st in inner.state.values()):
        found.append("optimizer state half-initialised")
    if isinstance(opt, MixedPrecisionOptimizer):
        for params, masters in zip(opt.model_params, opt.master_params):
            views = (
                masters[0].detach().split([p.numel() for p in params])
                if opt.flat_master
                else [m.detach() for m in masters]
            )
            for p, m in zip(params, views):
                if not torch.equal(p.detach(), m.view_as(p).to(p.dtype)):
                    found.append("the model does not hold its rounded masters")
                    return found
    return found


class _References:
    """Per number of steps taken: the state of a learner that took them without stopping,
    and after one more full fit."""

    def __init__(self, options):
        self.options, self.cache = options, {}

    def __call__(self, taken: int):
        if taken not in self.cache:
            ref = _learner(self.options, BATCHES[:taken])
            if taken:
                ref.fit(1)
            after_stop = _state(ref)
            ref.data = DataBunch(list(BATCHES), device="cpu")
            ref.fit(1)
            self.cache[taken] = (after_stop, _state(ref))
        return self.cache[taken]


def _fit_interrupted(learn: Learner, delay: float) -> bool:
    """Fit once with SIGINT sent to the main thread after `delay` s; whether it stopped it."""
    timer = threading.Timer(delay, _thread.interrupt_main)
    gc.disable()  # a KeyboardInterrupt raised in a gc callback (hypothesis has one) is lost
    try:
        timer.start()
        learn.fit(1)
        timer.join()
        for _ in range(1000):  # a signal that came after the fit is raised here
            pass
    except KeyboardInterrupt:
        timer.join()
        return True
    finally:
        gc.enable()
    return False


def _check_fit_on(learn: Learner, refs: _References) -> list[str]:
    taken = learn.iteration
    after_stop, after_fit = refs(taken)
    problems = []
    try:
        assert_identical(_state(learn), after_stop)
    except AssertionError as e:
        problems.append(f"after the stop at step {taken}: {e}")
    learn.data = DataBunch(list(BATCHES), device="cpu")
    learn.fit(1)
    try:
        assert_identical(_state(learn), after_fit)
    except AssertionError as e:
        problems.append(f"fitting on from step {taken}: {e}")
    return problems


@pytest.fixture(autouse=True)
def python_sigint():
    """SIGINT raises KeyboardInterrupt here, even in a process started with it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("config", CONFIGS)
def test_sigint_at_random_moments_of_a_fit_leaves_a_learner_that_fits_on_exactly(config):
    options = CONFIGS[config]
    refs = _References(options)
    start = time.perf_counter()
    _learner(options).fit(1)
    span = time.perf_counter() - start
    rng = random.Random(config)
    stopped = 0
    for _ in range(10):
        learn = _learner(options)
        if _fit_interrupted(learn, rng.uniform(0.0, span)):
            stopped += 1
            problems = _problems(learn)
            assert not problems, problems
            problems = _check_fit_on(learn, refs)
            assert not problems, problems
    assert stopped  # some runs were really interrupted


def _interrupt_inside_step(learn: Learner, at: int) -> None:
    """Send SIGINT from inside the inner optimizer's step (the fused kernels' update on the
    fused path) at step `at`, so it arrives between the update and the copy to the model."""
    opt = learn.opt
    calls = [0]

    def interrupt(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == at + 1:
            _thread.interrupt_main()

    update = getattr(opt, "update", None)
    fused = update.kernel if update is not None and update.fused else None
    if fused is not None:
        update = fused.update_

        def update_then_interrupt(*args: Any, **kwargs: Any) -> None:
            update(*args, **kwargs)
            interrupt()

        fused.update_ = update_then_interrupt
    else:
        getattr(opt, "optimizer", opt).register_step_post_hook(interrupt)


@pytest.mark.parametrize("config", CONFIGS)
def test_sigint_inside_the_optimizer_step_is_raised_once_the_step_is_whole(config):
    options = CONFIGS[config]
    refs = _References(options)
    for at in range(N_BATCHES):
        learn = _learner(options)
        if learn.opt is None:
            learn.create_opt()
        _interrupt_inside_step(learn, at)
        with pytest.raises(KeyboardInterrupt):
            learn.fit(1)
        assert learn.iteration == at + 1  # the step was taken and counted
        assert _problems(learn) == []
        assert _check_fit_on(learn, refs) == []


class _StopAtTrainEnd(Callback):
    def on_train_end(self, **kwargs: Any) -> None:
        raise KeyboardInterrupt


def test_a_keyboard_interrupt_in_one_on_train_end_still_runs_the_others():
    learn = _learner(CONFIGS["master"])
    learn.add_cb(_StopAtTrainEnd())
    probe = Probe()
    learn.add_cb(probe)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1)
    assert probe.events()[-1] == "on_train_end"
    assert learn.data.tfms == []  # MixedPrecision's on_train_end ran too
    assert _problems(learn) == []


def test_a_failing_inner_step_leaves_no_half_made_state_and_the_model_on_its_masters():
    learn = _learner(CONFIGS["master"])
    inner = learn.opt.optimizer

    def half_init_then_fail(opt, args, kwargs):
        for p in opt.param_groups[0]["params"]:
            opt.state[p]["step"] = torch.tensor(0.0)  # as torch's lazy init, cut short
        raise KeyboardInterrupt

    handle = inner.register_step_pre_hook(half_init_then_fail)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1)
    handle.remove()
    assert not inner.state  # the half-made entries are gone
    assert learn.iteration == 0 and _problems(learn) == []
    assert _check_fit_on(learn, _References(CONFIGS["master"])) == []


def test_a_ctrl_c_as_the_clean_up_starts_still_runs_on_train_end(monkeypatch):
    """A KeyboardInterrupt landing between `finally:` and the clean-up's deferred region (the
    window a random Ctrl-C hits about once in a hundred) is held until on_train_end ran."""
    import mixprec.learner.learner as learner_module

    learn = _learner(CONFIGS["master"])
    real = learner_module.deferred_interrupt
    armed, fired = [], []

    def interrupted_once():
        if armed and not fired:  # the clean-up's region: interrupted before it is entered
            fired.append(1)
            raise KeyboardInterrupt
        return real()

    class Stop(Callback):
        def on_batch_end(self, **kwargs):
            armed.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(learner_module, "deferred_interrupt", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, callbacks=[Stop()])
    monkeypatch.undo()
    assert fired and learn.data.tfms == []  # on_train_end removed the input transform
