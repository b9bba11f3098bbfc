"""AutocastOptimizer: the autocast mode's engine, beside torch.amp's autocast + GradScaler."""

import copy
import signal

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mixprec import AutocastOptimizer, MixedPrecisionOptimizer, Stepper, model_to_half

INF_STEP = 2  # the step whose gradients get an inf


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


@pytest.mark.parametrize("fused", [None, False], ids=["fused_default", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_it_matches_torch_amp_bit_for_bit_through_an_overflow(dtype, fused):
    model = nn.Sequential(nn.Linear(8, 160), nn.ReLU(), nn.Linear(160, 4))  # vector lanes too
    ref = copy.deepcopy(model)
    opt = AutocastOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        "dynamic",
        dtype=dtype,
        growth_interval=2,
        fused=fused,
    )
    assert opt.fused is (fused is None)
    # torch's own fused AdamW, given the scale by GradScaler, is the fused path's reference
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused is None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    for step in range(6):
        x, y = batch(step)
        with opt.autocast():
            out = model(x)
            assert out.dtype == dtype
            loss = F.cross_entropy(out, y)
        opt.backward(loss)
        with torch.autocast("cpu", dtype=dtype):
            ref_loss = F.cross_entropy(ref(x), y)
        scaler.scale(ref_loss).backward()
        if step == INF_STEP:
            model[0].weight.grad[0, 0] = float("inf")
            ref[0].weight.grad[0, 0] = float("inf")
        before = copy.deepcopy(opt.state_dict()["optimizer"]["state"])
        assert opt.step() is (step != INF_STEP)
        scaler.step(ref_opt)
        scaler.update()
        assert opt.loss_scale == scaler.get_scale()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.dtype == torch.float32 and torch.equal(p, q)
        if step == INF_STEP:  # the skipped step left the optimizer state alone
            after = opt.state_dict()["optimizer"]["state"]
            assert all(torch.equal(before[k]["exp_avg"], after[k]["exp_avg"]) for k in before)
        opt.zero_grad()
        ref_opt.zero_grad()
    assert opt.skipped_steps == 1 and not torch.is_autocast_enabled("cpu")


def test_backward_twice_accumulates_in_fp32():
    model = mlp()
    twice = copy.deepcopy(model)
    x, y = batch(0)
    opt = AutocastOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 512.0)
    opt2 = AutocastOptimizer(torch.optim.SGD(twice.parameters(), lr=0.1), 512.0)
    with opt.autocast():
        loss = F.cross_entropy(model(x), y)
    opt.backward(loss)
    for half in (slice(0, 8), slice(8, 16)):
        with opt2.autocast():
            loss = F.cross_entropy(twice(x[half]), y[half]) / 2
        opt2.backward(loss)
    assert opt.step() and opt2.step()
    for p, q in zip(model.parameters(), twice.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)


def test_clip_uses_one_global_norm_over_the_unscaled_grads():
    model = mlp()
    x, y = batch(0)
    opt = AutocastOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), 1024.0, clip=0.1)
    with opt.autocast():
        loss = F.cross_entropy(model(x), y)
    opt.backward(loss)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    opt.unscale_()
    torch.testing.assert_close(opt.last_grad_norm, expected / 1024.0)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(0.1), rtol=1e-4, atol=0)
    assert opt.step()


def test_state_dict_round_trip_resumes_exactly():
    def run(model, opt, steps):
        for step in steps:
            x, y = batch(step)
            with opt.autocast():
                loss = F.cross_entropy(model(x), y)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()

    def make(model):
        return AutocastOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), "dynamic", growth_interval=1
        )

    straight = mlp()
    resumed = copy.deepcopy(straight)
    opt = make(straight)
    run(straight, opt, range(4))
    opt2 = make(resumed)
    run(resumed, opt2, range(2))
    saved = copy.deepcopy({"model": resumed.state_dict(), "opt": opt2.state_dict()})
    assert saved["opt"]["mode"] == "autocast"
    fresh = mlp()
    fresh.load_state_dict(saved["model"])
    opt3 = make(fresh)
    opt3.load_state_dict(saved["opt"])
    run(fresh, opt3, range(2, 4))
    assert opt3.loss_scale == opt.loss_scale  # grew each step, backed off once on overflow
    assert opt3.skipped_steps == opt.skipped_steps == 1
    for p, q in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_each_mode_refuses_the_other_modes_state():
    half = model_to_half(mlp())
    master = MixedPrecisionOptimizer(torch.optim.AdamW(half.parameters()))
    auto = AutocastOptimizer(torch.optim.AdamW(mlp().parameters()))
    with pytest.raises(ValueError, match=r"saved in mode='master'.*loaded in mode='autocast'"):
        auto.load_state_dict(master.state_dict())
    with pytest.raises(ValueError, match=r"saved in mode='autocast'.*loaded in mode='master'"):
        master.load_state_dict(auto.state_dict())
    with pytest.raises(ValueError, match="not an AutocastOptimizer state_dict: missing"):
        auto.load_state_dict({"optimizer": {}})


def test_contradictory_and_bad_arguments_are_refused():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match=r"AutocastOptimizer\(flat_master=True\): flat_master"):
        AutocastOptimizer(torch.optim.SGD(params, lr=0.1), flat_master=True)
    with pytest.raises(ValueError, match="fused=True cannot be used: the fused step implements"):
        AutocastOptimizer(torch.optim.SGD(params, lr=0.1), fused=True)
    with pytest.raises(TypeError, match="fused must be"):
        AutocastOptimizer(torch.optim.AdamW(params), fused="yes")
    AutocastOptimizer(torch.optim.SGD(params, lr=0.1), flat_master=False)  # harmless
    halves = list(model_to_half(mlp()).parameters())
    with pytest.raises(ValueError, match="trains an fp32 model, but the optimizer holds"):
        AutocastOptimizer(torch.optim.SGD(halves, lr=0.1))
    opt = AutocastOptimizer(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="trains an fp32 model"):
        opt.add_param_group({"params": halves})
    with pytest.raises(TypeError, match="already a AutocastOptimizer; wrap a plain"):
        AutocastOptimizer(opt)
    with pytest.raises(ValueError, match="clip must be None or a positive finite"):
        AutocastOptimizer(torch.optim.SGD(params, lr=0.1), clip=-1.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        AutocastOptimizer(torch.optim.SGD(params, lr=0.1), dtype=torch.float64)


def test_call_order_is_enforced():
    model = mlp()
    opt = AutocastOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no gradients to step on"):
        opt.step()
    x, y = batch(0)
    opt.backward(F.cross_entropy(model(x), y))
    opt.unscale_()
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        opt.unscale_()
    with pytest.raises(RuntimeError, match="call step\\(\\) before the next backward"):
        opt.backward(F.cross_entropy(model(x), y))
    with pytest.raises(TypeError, match="takes no closure"):
        opt.step(lambda: 0.0)
    assert opt.step()


def test_the_autocast_region_is_left_when_the_forward_raises():
    opt = AutocastOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1), dtype=torch.bfloat16)
    with pytest.raises(KeyError), opt.autocast():
        assert torch.is_autocast_enabled("cpu")
        raise KeyError("cancelled")
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("at", ["set_autocast_dtype", "autocast_decrement_nesting"])
def test_a_ctrl_c_while_the_region_is_entered_or_left_never_leaves_autocast_on(at, monkeypatch):
    # torch.autocast's __enter__ and __exit__ are several calls: SIGINT arrives between two
    opt = AutocastOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1), dtype=torch.float16)
    real = getattr(torch, at)

    def then_sigint(*args):
        result = real(*args)
        signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch, at, then_sigint)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), opt.autocast():
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not torch.is_autocast_enabled("cpu")
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_schedulers_and_stepper_advance_on_applied_steps_only():
    model = mlp()
    opt = AutocastOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), "dynamic")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    stepper = Stepper(opt, sched)
    x, y = batch(0)
    for bad in (False, True, False):
        with opt.autocast():
            loss = F.cross_entropy(model(x), y) * (float("inf") if bad else 1.0)
        assert stepper.step(loss) is not bad
    assert stepper.skipped_steps == 1 and opt.param_groups[0]["lr"] == 0.25
    assert opt.loss_scale == 2.0**15


def _fit(model, opt, steps, clip_first=False, inf_step=None):
    for step in steps:
        x, y = batch(step)
        with opt.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.backward(loss)
        if step == inf_step:
            model[0].weight.grad[0, 0] = float("nan")
        if clip_first:
            opt.unscale_()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("clip_first", [False, True], ids=["in_step", "unscale_first"])
def test_the_fused_step_clips_and_skips_as_the_unfused_one(clip_first):
    models = [mlp() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        AutocastOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-2), "dynamic", clip=0.05, fused=fused
        )
        for m, fused in zip(models, (True, False))
    ]
    for m, opt in zip(models, opts):
        _fit(m, opt, range(5), clip_first=clip_first, inf_step=3)
    fused, unfused = opts
    assert fused.skipped_steps == unfused.skipped_steps == 1
    assert fused.last_overflow.faults == unfused.last_overflow.faults  # the same parameter named
    assert fused.last_overflow.faults[0].nan == 1
    torch.testing.assert_close(fused.last_grad_norm, unfused.last_grad_norm, rtol=1e-6, atol=0)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the same optimizer state, so either path resumes the other's checkpoint
    unfused.load_state_dict(fused.state_dict())
    _fit(models[1], unfused, range(5, 6))


def test_an_automatic_fused_step_gives_way_to_step_hooks():
    model = mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = AutocastOptimizer(inner, 512.0)
    calls = []
    handle = inner.register_step_post_hook(lambda o, a, k: calls.append(len(o.param_groups)))
    _fit(model, opt, range(2))
    assert calls == [1, 1]  # the wrapped optimizer's own step ran, its hook with it
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    _fit(model, opt, range(2, 3))  # fused again: the hook is gone
    assert calls == [1, 1] and opt.fused
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
