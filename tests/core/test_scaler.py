import math
import warnings

import pytest
import torch

from mixprec import LossScaler
from mixprec.core.scaler import unscale_and_check_

# clean (False) and overflowing (True) steps, chosen to cross growth and backoff several times
SCRIPT = [False] * 7 + [True] + [False] * 3 + [True, True] + [False] * 10 + [True] + [False] * 4


def _grad_scaler_trace(script, init_scale, growth_interval):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=init_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=growth_interval,
    )
    trace = []
    for overflow in script:
        scaler.scale(torch.ones(()))  # initialises the scale on the device
        p.grad = torch.full((3,), math.inf if overflow else 1.0)
        scaler.step(opt)
        scaler.update()
        trace.append(scaler.get_scale())
    return trace


def test_dynamic_trace_matches_torch_grad_scaler():
    expected = _grad_scaler_trace(SCRIPT, init_scale=2.0**10, growth_interval=3)
    scaler = LossScaler(
        "dynamic", init_scale=2.0**10, growth_interval=3, min_scale=2.0**-20, max_scale=2.0**40
    )
    trace = []
    for overflow in SCRIPT:
        scaler.update(overflow)
        trace.append(scaler.scale)
    assert trace == expected
    assert scaler.skipped_steps == sum(SCRIPT)
    assert len(set(trace)) > 3  # the script really moved the scale both ways


def test_hysteresis_tolerates_overflows_before_backing_off():
    scaler = LossScaler(init_scale=64.0, hysteresis=3, growth_interval=100)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 64.0
    scaler.update(True)
    assert scaler.scale == 32.0
    assert scaler.skipped_steps == 3


def test_growth_is_capped_by_max_scale_and_backoff_by_min_scale():
    scaler = LossScaler(init_scale=4.0, growth_interval=1, max_scale=16.0, min_scale=2.0)
    for _ in range(5):
        scaler.update(False)
    assert scaler.scale == 16.0
    scaler = LossScaler(init_scale=4.0, min_scale=2.0, floor_patience=50)
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 2.0


def test_persistent_overflow_at_the_floor_raises():
    scaler = LossScaler(init_scale=4.0, min_scale=1.0, floor_patience=3)
    scaler.update(True)  # 4 -> 2
    scaler.update(True)  # 2 -> 1
    scaler.update(True)  # at the floor: 1
    scaler.update(True)  # 2
    with pytest.raises(
        FloatingPointError, match=r"3 consecutive steps at the minimum loss scale 1.0.*bf16"
    ):
        scaler.update(True)
    assert scaler.skipped_steps == 5


def test_static_scale_skips_without_moving_and_raises_on_a_run_of_skips():
    scaler = LossScaler(512.0, floor_patience=3)
    scaler.update(True)
    scaler.update(True)
    scaler.update(False)  # a clean step resets the run
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 4
    with pytest.raises(FloatingPointError, match=r"static loss scale 512\.0"):
        scaler.update(True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_scale": 0}, "positive finite"),
        ({"loss_scale": -1.0}, "positive finite"),
        ({"loss_scale": math.nan}, "positive finite"),
        ({"loss_scale": math.inf}, "positive finite"),
        ({"loss_scale": "dynamc"}, 'or "dynamic"'),
        ({"loss_scale": "Dynamic"}, 'or "dynamic"'),
        ({"growth_factor": 0.5}, "growth_factor must be >= 1"),
        ({"backoff_factor": 1.5}, r"backoff_factor must be in \(0, 1\)"),
        ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
        ({"hysteresis": 1.5}, "hysteresis must be an integer >= 1"),
        ({"min_scale": 4.0, "max_scale": 2.0}, "min_scale must be <= max_scale"),
        ({"init_scale": 2.0**30}, "init_scale must lie in"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**kwargs)


@pytest.mark.parametrize("bad", [True, None, [1.0]])
def test_non_numbers_raise_value_error(bad):
    with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
        LossScaler(bad)


def test_state_dict_round_trip_and_tolerates_new_keys():
    scaler = LossScaler(init_scale=256.0, growth_interval=2, hysteresis=2)
    for overflow in [False, True, False, False, True, True, False]:
        scaler.update(overflow)
    state = scaler.state_dict()
    assert all(isinstance(v, (int, float, bool)) for v in state.values())
    other = LossScaler(init_scale=256.0, growth_interval=2, hysteresis=2)
    other.load_state_dict({**state, "added_by_a_newer_version": 1})
    assert other.state_dict() == state
    for overflow in [True, False, False]:  # and both go on identically
        scaler.update(overflow)
        other.update(overflow)
    assert other.state_dict() == scaler.state_dict()


def test_loading_a_static_state_into_a_dynamic_scaler_is_refused():
    with pytest.raises(ValueError, match="from a static scaler but this one is dynamic"):
        LossScaler("dynamic").load_state_dict(LossScaler(128.0).state_dict())


def test_scale_loss_returns_fp32_loss_times_scale():
    loss = torch.tensor(3.0, dtype=torch.float16)
    scaled = LossScaler(8.0).scale_loss(loss)
    assert scaled.dtype == torch.float32 and scaled.item() == 24.0


def test_unscale_and_check_is_fused_over_all_grads():
    grads = [torch.full((4,), 8.0), torch.full((2, 2), 4.0, dtype=torch.float16)]
    found = unscale_and_check_(grads, 0.25)
    assert found.item() == 0.0
    assert torch.equal(grads[0], torch.full((4,), 2.0))
    assert torch.equal(grads[1], torch.ones(2, 2, dtype=torch.float16))
    grads[1][0, 1] = math.nan
    assert unscale_and_check_(grads, 1.0).item() == 1.0
    assert unscale_and_check_([], 1.0) is None


def test_on_load_the_scaler_settings_win_over_the_saved_scale():
    """Decided: a static scaler keeps the loss_scale it was built with; a dynamic one clamps
    the saved scale into its [min_scale, max_scale]; both warn. Built alike, exact resume."""
    saved = LossScaler(512.0).state_dict()
    static = LossScaler(8.0)
    with pytest.warns(
        RuntimeWarning, match=r"saved static loss scale 512.0 differs .* keeping 8.0"
    ):
        static.load_state_dict(saved)
    assert static.scale == 8.0
    big = LossScaler("dynamic", init_scale=131072.0)
    big.update(False)
    capped = LossScaler("dynamic", init_scale=512.0, max_scale=1024.0)
    with pytest.warns(
        RuntimeWarning, match=r"131072.0 lies outside .* \[1.0, 1024.0\]; using 1024.0"
    ):
        capped.load_state_dict(big.state_dict())
    assert capped.scale == 1024.0 and capped.steps == 1
    same = LossScaler(512.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved)  # built alike: silent and exact
    assert same.state_dict() == saved


def test_learner_load_keeps_its_own_static_scale(tmp_path):
    from helpers.learner import make_learner

    saver = make_learner(tmp_path).to_fp16(loss_scale=512.0)
    saver.save("s512")
    learn = make_learner(tmp_path).to_fp16(loss_scale=8.0)
    with pytest.warns(RuntimeWarning, match="keeping 8.0"):
        learn.load("s512")
    assert learn.opt.scaler.scale == 8.0
