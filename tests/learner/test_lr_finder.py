"""lr_find: an exponential sweep that stops on divergence, a suggestion and a plot, and a
learner left exactly as it was (model, masters, optimizer state, scaler, history, RNG)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.learner import assert_identical, make_learner, snapshot
from mixprec.learner.lr_finder import LRFinder, suggest_lr

PRECISIONS = {
    "fp32": {},
    "bf16": {"dtype": torch.bfloat16},
    "fp16 dynamic": {"loss_scale": "dynamic", "init_scale": 2.0**12, "growth_interval": 2},
}


@pytest.mark.parametrize("options", PRECISIONS.values(), ids=PRECISIONS.keys())
def test_lr_find_leaves_the_learner_exactly_as_it_was(tmp_path, options):
    def make():
        learn = make_learner(tmp_path)
        if options:
            learn.to_fp16(**options)
        learn.fit(1)  # optimizer moments, a scaler that moved, a history
        return learn

    learn, twin = make(), make()
    before = snapshot(learn)
    history = learn.recorder.state_dict()
    counts = (learn.epoch, learn.iteration)
    rng = torch.get_rng_state()
    found = learn.lr_find(num_it=12, end_lr=100.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(found.lrs) >= 3 and found.lrs[0] == pytest.approx(1e-7)
    assert_identical(snapshot(learn), before, "after lr_find")
    assert learn.recorder.state_dict() == history and (learn.epoch, learn.iteration) == counts
    # the random state too: training on is bit-identical to never having swept
    learn.fit(1)
    torch.set_rng_state(rng)
    twin.fit(1)
    assert_identical(snapshot(learn), snapshot(twin), "fit after lr_find")


def test_a_fresh_learner_gets_its_optimizer_built_afresh_after_the_sweep(tmp_path):
    learn, twin = make_learner(tmp_path), make_learner(tmp_path)
    rng = torch.get_rng_state()
    learn.lr_find(num_it=5)
    assert learn.opt is None and learn.recorder.steps == 0
    learn.fit(1, 1e-2)
    torch.set_rng_state(rng)
    twin.fit(1, 1e-2)
    assert_identical(snapshot(learn), snapshot(twin))


def test_the_sweep_is_exponential_stops_on_divergence_and_suggests(tmp_path):
    learn = make_learner(tmp_path)
    found = learn.lr_find(start_lr=1e-5, end_lr=1e4, num_it=60)
    assert len(found.lrs) < 60  # lr 1e4 blows AdamW up long before the end
    ratios = [b / a for a, b in zip(found.lrs, found.lrs[1:])]
    assert ratios == pytest.approx([1e9 ** (1 / 59)] * len(ratios))
    assert found.losses[-1] > 4 * min(found.losses) or not math.isfinite(found.losses[-1])
    assert 1e-5 < found.suggestion < found.lrs[-1] and found.lr_min < found.lrs[-1]
    assert found.plot(tmp_path / "lr.png").stat().st_size > 0


def test_suggestion_is_the_steepest_descent_and_bad_arguments_are_refused():
    lrs = [10.0**k for k in range(-6, 1)]
    assert suggest_lr(lrs, [5, 5, 4.9, 3, 1, 1, 9], skip_start=0, skip_end=0) == 1e-3
    assert suggest_lr([1e-3, 1e-2], [1.0, 0.5]) is None
    with pytest.raises(ValueError, match=r"end_lr must be above start_lr; got 1.0 and 0.1"):
        LRFinder(1.0, 0.1)
    with pytest.raises(ValueError, match="num_it must be an integer >= 2; got 1"):
        LRFinder(num_it=1)
