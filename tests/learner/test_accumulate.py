"""Gradient accumulation: N micro-batches per optimizer step train as one N-times-larger batch
(within rounding) in fp32, fp16 and bf16; the recorder keeps one loss per step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mixprec import Callback, DataBunch, Learner

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |w_accumulated - w_large_batch| allowed after 4 AdamW steps at lr 1e-2: a few roundings
# of the gradients in each dtype (a half grad holds ~3 (bf16) or ~4 (fp16) digits)
# (measured: 3e-8, 2e-5 and 2e-4; the weights move by 4e-2)
TOLERANCE = {"fp32": 1e-6, "fp16": 1e-4, "bf16": 1e-3}


def learner(batch_size: int, accumulate: int, dtype: torch.dtype | None) -> Learner:
    """No BatchNorm (its statistics are per micro-batch by design), no dropout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = DataBunch(
        DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True), device="cpu"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    learn = Learner(data, model, progress=False, accumulate=accumulate)
    return learn if dtype is None else learn.to_fp16(dtype=dtype)


def weights(learn: Learner) -> torch.Tensor:
    opt = learn.opt
    params = (
        [m for g in opt.master_params for m in g]
        if hasattr(opt, "master_params")
        else learn.model.parameters()
    )
    return torch.cat([p.detach().float().reshape(-1) for p in params])


@pytest.mark.parametrize("name", PRECISIONS)
def test_accumulating_4_micro_batches_trains_as_one_4_times_larger_batch(name):
    dtype = PRECISIONS[name]
    start = weights(learner(32, 1, dtype))
    large = learner(32, 1, dtype)
    accumulated = learner(8, 4, dtype)
    small = learner(8, 1, dtype)  # the control: steps after every micro-batch
    for learn in (large, accumulated, small):
        torch.manual_seed(1)  # the same shuffling for all
        learn.fit(2, 1e-2)
    diff = (weights(accumulated) - weights(large)).abs().max().item()
    assert diff < TOLERANCE[name]
    assert (weights(large) - start).abs().max() > 10 * TOLERANCE[name]  # it trained
    assert (weights(small) - weights(large)).abs().max() > 10 * TOLERANCE[name]
    # one loss per step, the mean over its micro-batches: the large batch's loss
    assert accumulated.iteration == large.iteration == 4 and small.iteration == 16
    assert accumulated.recorder.losses == pytest.approx(large.recorder.losses, abs=1e-2)


def test_the_epochs_last_step_takes_the_micro_batches_left():
    learn = learner(8, 3, None)  # 8 batches per epoch: steps of 3, 3 and 2
    sizes = []

    class Count(Callback):
        def on_batch_begin(self, last_input, **kwargs):
            sizes.append(len(last_input))

        def on_step_end(self, **kwargs):
            sizes.append("step")

    learn.fit(1, callbacks=[Count()])
    assert sizes == [8, 8, 8, "step", 8, 8, 8, "step", 8, 8, "step"]
    assert learn.iteration == 3 and len(learn.recorder.losses) == 3
    with pytest.raises(ValueError, match="accumulate must be an integer >= 1"):
        learner(8, 0, None)
