"""Callback base, CallbackHandler, and the events as Learner.fit fires them."""

import pytest
import torch

from helpers.learner import Probe, make_learner
from mixprec import Callback
from mixprec.learner.callback import EVENTS, CallbackHandler

SPEC_EVENTS = [  # as SPEC section 3 lists them
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
]


class Double(Callback):
    def __init__(self, order: int = 0) -> None:
        self.order = order

    def on_loss_begin(self, last_output, **kwargs):
        return last_output * 2


class Scale(Callback):
    order = 99

    def on_backward_begin(self, last_loss, **kwargs):
        return last_loss * 512


class Boom(Callback):
    def on_epoch_begin(self, **kwargs):
        raise ZeroDivisionError("boom")


def test_the_ten_documented_events_are_no_ops_by_default():
    assert list(EVENTS) == SPEC_EVENTS
    cb = Callback()
    state = {"last_input": 1, "last_target": 2, "last_output": 3, "last_loss": 4}
    for event in EVENTS:
        assert getattr(cb, event)(**state) is None
    assert Callback.order == 0


def test_callbacks_run_in_order_and_returned_values_chain():
    late, early = Probe(order=5, keys=("last_output",)), Probe(order=-1, keys=("last_output",))
    handler = CallbackHandler([late, Double(order=0), early])
    assert [type(cb).__name__ for cb in handler.callbacks] == ["Probe", "Double", "Probe"]
    assert handler("on_loss_begin", last_output=torch.tensor(3.0)).item() == 6.0
    assert early.seen[0][1]["last_output"].item() == 3.0  # ran before Double
    assert late.seen[0][1]["last_output"].item() == 6.0  # ran after it
    assert handler("on_epoch_begin") is None


def test_on_batch_begin_replaces_the_batch_with_a_pair_only():
    class Swap(Callback):
        def on_batch_begin(self, last_input, last_target, **kwargs):
            return last_target, last_input

    assert CallbackHandler([Swap()])("on_batch_begin", last_input=1, last_target=2) == (2, 1)

    class Bad(Callback):
        def on_batch_begin(self, last_input, last_target, **kwargs):
            return last_input

    with pytest.raises(TypeError, match=r"Bad\.on_batch_begin must return None or an"):
        CallbackHandler([Bad()])("on_batch_begin", last_input=1, last_target=2)


def test_the_loss_returned_by_on_backward_begin_goes_to_backward_only():
    before, after = Probe(order=0, keys=("last_loss",)), Probe(order=100, keys=("last_loss",))
    handler = CallbackHandler([Scale(), before, after])
    loss = torch.tensor(2.0)
    assert handler("on_backward_begin", last_loss=loss).item() == 1024.0
    assert after.seen[0][1]["last_loss"].item() == 1024.0  # chained, inside the event
    handler("on_backward_end")
    assert before.seen[-1][1]["last_loss"] is loss  # later events see the unscaled loss
    assert handler.state["last_loss"] is loss


def test_an_error_names_the_callback_and_the_event_and_keeps_its_type():
    handler = CallbackHandler([Boom()])
    with pytest.raises(ZeroDivisionError, match="raised in callback Boom, event on_epoch_begin"):
        handler("on_epoch_begin")


def test_the_handler_rejects_unknown_events_and_non_callbacks():
    with pytest.raises(ValueError, match="unknown event 'on_batch_start'"):
        CallbackHandler([])("on_batch_start")
    with pytest.raises(TypeError, match="callbacks must be Callback instances; got"):
        CallbackHandler([print])


def test_fit_fires_the_events_in_order(tmp_path):
    probe = Probe()
    learn = make_learner(tmp_path, callbacks=[probe])
    learn.data.train_dl.dl = list(learn.data.train_dl.dl)[:2]  # two batches
    learn.fit(1)
    batch = SPEC_EVENTS[2:8]
    valid = ["on_batch_begin", "on_loss_begin"] * 2  # validate() shapes its 2 batches too
    assert probe.events() == [*SPEC_EVENTS[:2], *batch, *batch, *valid, *SPEC_EVENTS[8:]]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_on_train_end_runs_when_fit_stops_on_an_exception(tmp_path, error):
    class Stop(Callback):
        def on_batch_end(self, iteration, **kwargs):
            if iteration == 1:
                raise error("stop")

    probe = Probe(keys=("exception",))
    learn = make_learner(tmp_path, callbacks=[Stop(), probe]).to_fp16()
    with pytest.raises(error, match="stop"):
        learn.fit(1)
    event, state = probe.seen[-1]
    assert event == "on_train_end" and isinstance(state["exception"], error)
    assert learn.data.tfms == []  # MixedPrecision's on_train_end removed its input transform
    assert learn.iteration == 2 == learn.opt.scaler.steps  # the second step was taken
