"""Stopping from a callback (fastai v1's True from on_batch_end / on_epoch_end),
EarlyStoppingCallback and SaveModelCallback."""

from __future__ import annotations

import pytest
import torch

from helpers.learner import make_learner, master_of
from mixprec import Callback
from mixprec.learner.tracking import EarlyStoppingCallback, SaveModelCallback


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.ended = step, None

    def on_batch_end(self, learn, **kwargs):
        return learn.iteration == self.step

    def on_train_end(self, exception=None, **kwargs):
        self.ended = exception is None


def test_on_batch_end_returning_true_stops_cleanly_after_that_step(tmp_path):
    learn = make_learner(tmp_path).to_fp16(dtype=torch.bfloat16)
    stop = StopAt(6)
    learn.fit(5, callbacks=[stop])  # 4 steps per epoch: stops in the second epoch
    assert learn.iteration == 6 and len(learn.recorder.losses) == 6
    assert stop.ended  # on_train_end ran, without an exception
    assert learn.epoch == 2 and len(learn.recorder.val_losses) == 2  # that epoch was validated
    for p in learn.model.parameters():  # the model holds its masters' values
        assert torch.equal(p, master_of(learn, p).to(p.dtype))
    assert not learn.data.tfms  # the input cast was removed
    learn.fit(1)  # and training goes on from there
    assert learn.iteration == 10


def test_on_epoch_end_returning_true_stops_after_that_epoch(tmp_path):
    class Once(Callback):
        def on_epoch_end(self, **kwargs):
            return True

    learn = make_learner(tmp_path)
    learn.fit(3, callbacks=[Once()])
    assert learn.epoch == 1 and learn.iteration == 4


def test_early_stopping_waits_patience_epochs_without_improvement(tmp_path):
    learn = make_learner(tmp_path)
    early = EarlyStoppingCallback(monitor="accuracy", min_delta=2.0, patience=1)  # never improves
    learn.fit(10, callbacks=[early])
    assert learn.epoch == 3 and early.stopped_epoch == 2  # the first sets the best, 1 + 1 more
    with pytest.raises(ValueError, match=r"monitors 'f1', which validate\(\) does not return"):
        learn.fit(1, callbacks=[EarlyStoppingCallback(monitor="f1")])


def test_save_model_keeps_the_best_epoch_and_loads_it_at_the_end(tmp_path):
    learn = make_learner(tmp_path)
    losses = iter([0.5, 0.2, 0.4])

    class FakeLoss(Callback):  # validation losses 0.5, 0.2, 0.4: the second epoch is best
        order = 50

        def on_epoch_end(self, last_metrics, **kwargs):
            last_metrics[0] = next(losses)

    saver = SaveModelCallback(name="best")
    seen = {}

    class Keep(Callback):
        order = 70  # after the saver

        def on_epoch_end(self, epoch, **kwargs):
            seen[epoch] = {k: v.clone() for k, v in learn.model.state_dict().items()}

    learn.fit(3, callbacks=[FakeLoss(), saver, Keep()])
    assert saver.saved == ["best", "best"] and saver.best == 0.2
    for k, v in learn.model.state_dict().items():  # loaded back at the end: epoch 2's model
        assert torch.equal(v, seen[1][k]), k
    assert learn.epoch == 2
    every = SaveModelCallback(every="epoch", name="e")
    learn.fit(2, callbacks=[every])
    assert every.saved == ["e_2", "e_3"] and (tmp_path / "models" / "e_3.pth").exists()


def test_trackers_sit_out_the_lr_finders_sweep(tmp_path):
    early = EarlyStoppingCallback(patience=0)
    every = SaveModelCallback(every="epoch", name="e")
    learn = make_learner(tmp_path, callbacks=[early, every])
    found = learn.lr_find(num_it=12, stop_div=False)  # 3 epochs without validation
    assert len(found.lrs) == 12 and every.saved == [] and early.stopped_epoch is None
    assert not (tmp_path / "models").exists()
