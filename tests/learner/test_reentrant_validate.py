"""`learn.validate()` from a callback inside `fit`: it evaluates, leaves the training state as
it was, and training goes on with the numbers of a fit that never validated mid-epoch."""

import pytest
import torch

from helpers.learner import assert_identical, make_learner, snapshot
from mixprec import Callback

MODES = {
    "fp32": None,
    "fp16": {"dtype": torch.float16, "loss_scale": "dynamic"},
    "bf16": {"dtype": torch.bfloat16},
    "bf16_flat": {"dtype": torch.bfloat16, "flat_master": True},
    "autocast": {"dtype": torch.bfloat16, "mode": "autocast"},
    "split": {"dtype": torch.bfloat16, "master": "split"},
}


class ValidateEvery(Callback):
    """Validates every `every` steps from `event` (0: never); records what it saw."""

    def __init__(self, learn, event: str, order: int, every: int) -> None:
        self.learn, self.every, self.order = learn, every, order
        self.results: list[list[float]] = []
        self.state_changes: list[str] = []
        setattr(self, event, self._maybe_validate)

    @staticmethod
    def _state(learn) -> dict:
        return {
            "training": [m.training for m in learn.model.modules()],
            "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "autocast_dtype": torch.get_autocast_dtype("cpu"),
            "tfms": list(learn.data.tfms),
        }

    def _maybe_validate(self, iteration=0, **kwargs):
        if self.every and iteration % self.every == 0:
            before = self._state(self.learn)
            self.results.append(self.learn.validate())
            after = self._state(self.learn)
            self.state_changes += [k for k in before if before[k] != after[k]]


def _run(tmp_path, options, event: str, order: int, every: int):
    learn = make_learner(tmp_path)
    if options is not None:
        learn.to_fp16(**options)
    cb = ValidateEvery(learn, event, order, every)
    learn.add_cb(cb)
    torch.manual_seed(1)
    learn.fit(2, lr=1e-2)
    return learn, cb


EVENTS = [("on_batch_begin", -5), ("on_batch_begin", 200), ("on_loss_begin", 0), ("on_step_end", 0)]
CASES = [(m, *e) for m in MODES for e in EVENTS if m != "fp16" or e == EVENTS[0]]  # fp16: slow


@pytest.mark.parametrize("mode, event, order", CASES)
def test_validate_inside_fit_evaluates_and_changes_no_number(tmp_path, mode, event, order):
    plain, _ = _run(tmp_path, MODES[mode], event, order, every=0)
    learn, cb = _run(tmp_path, MODES[mode], event, order, every=3)
    assert len(cb.results) == 3  # steps 0, 3 and 6 of 8
    assert cb.state_changes == []
    assert_identical(snapshot(learn), snapshot(plain))
    assert_identical(learn.recorder.state_dict(), plain.recorder.state_dict())
    assert learn.iteration == plain.iteration == 8
    assert learn.validate() == plain.validate()
    assert cb.results[0] != cb.results[-1]  # evaluated the model as it trained


def test_predict_inside_a_callback_event_runs_once(tmp_path):
    learn = make_learner(tmp_path)
    calls = []

    class PredictAtBatchBegin(Callback):
        def on_batch_begin(self, last_input, **kwargs):
            calls.append(kwargs.get("train"))
            learn.predict(last_input)

    learn.add_cb(PredictAtBatchBegin())
    learn.fit(1)
    # 4 training batches, 2 validation batches; never again from predict's own events
    assert calls == [True] * 4 + [False] * 2
