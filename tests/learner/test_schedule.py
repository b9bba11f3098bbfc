"""fit_one_cycle: fastai v1's one-cycle lr and momentum, step by step, against a re-enactment
of fastai v1's stateful schedulers; skipped steps advance it; the momentum is put back."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.learner import make_learner
from mixprec import Callback
from mixprec.learner.schedule import OneCycleScheduler, annealing_cos, one_cycle_lr, one_cycle_mom


def fastai_v1_one_cycle(n: int, max_lr: float, div: float, pct_start: float, final_div, moms):
    """What fastai v1's OneCycleScheduler sets for each of `n` steps: its Scheduler objects
    re-enacted (start value at train begin, `step()` after every batch, next phase when done)."""
    final_div = div * 1e4 if final_div is None else final_div

    def cos(start, end, pct):  # fastai v1's annealing_cos
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    a1 = int(n * pct_start)
    phases = [
        (a1, (max_lr / div, max_lr), moms),
        (n - a1, (max_lr, max_lr / final_div), moms[::-1]),
    ]
    phases = [p for p in phases if p[0] > 0]
    idx, count = 0, 0
    lr, mom = phases[0][1][0], phases[0][2][0]
    out = []
    for _ in range(n):
        out.append((lr, mom))
        count += 1  # Scheduler.step()
        n_iter, (lr0, lr1), (m0, m1) = phases[idx]
        lr, mom = cos(lr0, lr1, count / n_iter), cos(m0, m1, count / n_iter)
        if count >= n_iter and idx + 1 < len(phases):
            idx, count = idx + 1, 0
    return out


@pytest.mark.parametrize(
    ("n", "pct_start", "final_div"), [(40, 0.3, None), (17, 0.25, 100.0), (5, 0.0, None)]
)
def test_the_pure_schedule_is_fastai_v1s(n, pct_start, final_div):
    expected = fastai_v1_one_cycle(n, 1e-2, 25.0, pct_start, final_div, (0.95, 0.85))
    got = [
        (
            one_cycle_lr(i, n, 1e-2, 25.0, pct_start, final_div),
            one_cycle_mom(i, n, (0.95, 0.85), pct_start),
        )
        for i in range(n)
    ]
    flat = lambda pairs: [v for pair in pairs for v in pair]  # noqa: E731
    assert flat(got) == pytest.approx(flat(expected), rel=1e-12)
    assert annealing_cos(1.0, 0.0, 0.5) == pytest.approx(0.5)


def test_fit_one_cycle_sets_and_records_each_steps_lr_and_beta1(tmp_path):
    learn = make_learner(tmp_path)  # AdamW, 4 steps per epoch
    learn.fit_one_cycle(3, 1e-2)
    expected = fastai_v1_one_cycle(12, 1e-2, 25.0, 0.3, None, (0.95, 0.85))
    assert learn.recorder.lrs == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    assert learn.recorder.moms == pytest.approx([m for _, m in expected], rel=1e-12)
    assert learn.recorder.lrs[0] == pytest.approx(1e-2 / 25)
    assert learn.recorder.lrs[-1] < 1e-2 / 25  # annealed towards max_lr / (div * 1e4)
    # every param group followed it, and beta1 is back to AdamW's 0.9 after the fit
    assert all(g["betas"] == (0.9, 0.999) for g in learn.opt.param_groups)
    assert all(g["lr"] == learn.recorder.lrs[-1] for g in learn.opt.param_groups)
    assert learn.recorder.plot_lr(tmp_path / "lr.png").stat().st_size > 0


def test_sgd_momentum_and_accumulated_steps(tmp_path):
    learn = make_learner(
        tmp_path, opt_func=lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.5), accumulate=2
    )
    learn.fit_one_cycle(2, 0.1, moms=(0.9, 0.8))  # 2 steps of 2 micro-batches per epoch
    expected = fastai_v1_one_cycle(4, 0.1, 25.0, 0.3, None, (0.9, 0.8))
    assert learn.recorder.moms == pytest.approx([m for _, m in expected], rel=1e-12)
    assert learn.opt.param_groups[0]["momentum"] == 0.5


def test_a_skipped_step_still_advances_the_schedule(tmp_path):
    learn = make_learner(tmp_path).to_fp16(dtype=torch.bfloat16)

    class Overflow(Callback):
        order = 50  # before MixedPrecision's unscale

        def on_backward_end(self, learn, iteration, **kwargs):
            if iteration == 2:
                next(learn.model.parameters()).grad.view(-1)[0] = float("inf")

    learn.fit_one_cycle(2, 1e-2, callbacks=[Overflow()])
    assert learn.recorder.skipped == [False, False, True, False, False, False, False, False]
    expected = [lr for lr, _ in fastai_v1_one_cycle(8, 1e-2, 25.0, 0.3, None, (0.95, 0.85))]
    assert learn.recorder.lrs == pytest.approx(expected, rel=1e-12)


def test_bad_one_cycle_arguments_are_refused_before_training(tmp_path):
    learn = make_learner(tmp_path)
    for kwargs, message in [
        ({"max_lr": 0.0}, "max_lr must be a positive finite number; got 0.0"),
        ({"pct_start": 1.0}, r"pct_start must be a number in \[0, 1\); got 1.0"),
        ({"moms": (0.95,)}, "moms must be None or a pair"),
        ({"div": -1}, "div must be a positive finite number; got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            learn.fit_one_cycle(1, **kwargs)
    assert learn.recorder.steps == 0 and learn.opt is None
    with pytest.raises(ValueError, match="total must be a number of steps >= 1"):
        OneCycleScheduler(1e-2, 0)
