"""Learner-side scenarios a fastai-v1 user hits: events under exceptions, half models outside
fit, metrics and checkpoints."""

from __future__ import annotations

import pytest
import torch

from learner_helpers import make_learner
from mixprec import Callback


class FailingTrainEnd(Callback):
    """An on_train_end that raises, as a callback saving a file to a full disk would."""

    def on_train_end(self, **kwargs):
        raise RuntimeError("disk full")


def test_on_train_end_of_every_callback_runs_when_one_raises(tmp_path):
    learn = make_learner(tmp_path, callbacks=[FailingTrainEnd()]).to_fp16()
    with pytest.raises(RuntimeError, match="disk full"):
        learn.fit(1)
    assert learn.data.tfms == []  # MixedPrecision still removed its input transform
    x, _ = next(iter(learn.data.train_dl))
    assert x.dtype == torch.float32
