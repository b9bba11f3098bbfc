import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers.learner import make_learner
from helpers.tensors import tensors_in
from mixprec import (
    MixedPrecision,
    MixedPrecisionOptimizer,
    get_master,
    model_g2master_g,
    model_to_half,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _mixed(flat=False, opt=torch.optim.AdamW, loss_scale="dynamic", **kw):
    model = model_to_half(_model())
    return model, MixedPrecisionOptimizer(
        opt(model.parameters(), lr=1e-2), loss_scale, flat_master=flat, **kw
    )


def _train_step(model, opt, x, y):
    loss = F.cross_entropy(model(x.half()).float(), y)
    opt.backward(loss)
    applied = opt.step()
    opt.zero_grad()
    return applied


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_state_equal(a, b):
    ta = [t for t in tensors_in(a)]
    tb = [t for t in tensors_in(b)]
    assert len(ta) == len(tb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("flat", [False, True])
def test_an_inf_at_step_k_skips_it_and_changes_nothing(flat):
    model, opt = _mixed(flat, loss_scale=256.0)
    x, y = _data()
    for _ in range(3):
        assert _train_step(model, opt, x, y)
    before, weights = _snapshot(opt), copy.deepcopy(model.state_dict())
    loss = F.cross_entropy(model(x.half()).float(), y) * torch.tensor(math.inf)
    opt.backward(loss)
    assert opt.step() is False
    after = _snapshot(opt)
    _assert_state_equal(before, after)  # every tensor: masters, moments, step counts
    assert after["scaler"] == {
        **before["scaler"],
        "steps": 4,
        "skipped_steps": 1,
        "consecutive_skips": 1,
        "floor_overflows": 1,
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert opt.skipped_steps == 1 and opt.loss_scale == 256.0
    assert _train_step(model, opt, x, y)  # and training goes on


def test_dynamic_scale_backs_off_on_overflow():
    model, opt = _mixed(loss_scale="dynamic", init_scale=2.0**20)
    x, y = _data()
    # 2**20 * a loss ~1 overflows fp16 grads (max 65504)
    applied = [_train_step(model, opt, x, y) for _ in range(8)]
    assert not applied[0] and applied[-1]
    assert opt.loss_scale < 2.0**20 and opt.skipped_steps == applied.count(False)


def test_one_sgd_step_matches_the_fp32_reference_within_fp16_rounding():
    x, y = _data()
    ref = _model()
    half = model_to_half(copy.deepcopy(ref))
    ref_values = [p.detach().half().float() for p in ref.parameters()]  # same starting point
    with torch.no_grad():
        for p, v in zip(ref.parameters(), ref_values):
            p.copy_(v)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    opt = MixedPrecisionOptimizer(torch.optim.SGD(half.parameters(), lr=0.1), 1024.0)
    opt.backward(F.cross_entropy(half(x.half()).float(), y))
    assert opt.step()
    for p_ref, master, p in zip(ref.parameters(), opt.master_params[0], half.parameters()):
        assert torch.allclose(master, p_ref, rtol=0, atol=2e-3)
        assert torch.equal(p.detach(), master.detach().to(p.dtype))


@pytest.mark.parametrize("flat", [False, True])
def test_backward_twice_accumulates_in_fp32(flat):
    p = nn.Parameter(torch.zeros(2).half())
    opt = MixedPrecisionOptimizer(torch.optim.SGD([p], lr=1.0), 2.0**15, flat_master=flat)
    # each micro-batch gives a scaled grad of 2**15 * 1.5 = 49152 (< 65504); the sum overflows half
    for _ in range(2):
        opt.backward((p.float() * 1.5).sum())
    opt.unscale_()
    grads = opt.master_params[0][0].grad
    assert grads.dtype == torch.float32 and grads.tolist() == [3.0, 3.0]
    assert opt.step() is True
    assert p.tolist() == [-3.0, -3.0]


@pytest.mark.parametrize("flat", [False, True])
def test_flat_and_per_tensor_masters_train_identically(flat):
    x, y = _data()
    runs = []
    for flat_master in (False, True):
        model, opt = _mixed(flat_master)
        for _ in range(5):
            _train_step(model, opt, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_clip_uses_one_global_norm_over_unscaled_master_grads():
    x, y = _data()
    model, opt = _mixed(opt=torch.optim.SGD, loss_scale=512.0, clip=0.05)
    opt.backward(F.cross_entropy(model(x.half()).float(), y))
    model_grads = [p.grad.float() / 512.0 for p in model.parameters()]
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in model_grads]))
    opt.unscale_()
    assert torch.allclose(opt.last_grad_norm, expected_norm, rtol=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([m.grad.norm() for m in opt.master_params[0]]))
    assert expected_norm > 0.05 and torch.allclose(clipped, torch.tensor(0.05), rtol=1e-4)
    assert opt.step()


def test_lr_schedulers_drive_it_and_can_be_gated_on_applied_steps():
    model, opt = _mixed(loss_scale="dynamic", init_scale=2.0**20)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    applied = 0
    for _ in range(6):
        if _train_step(model, opt, x, y):
            sched.step()
            applied += 1
    assert 0 < applied < 6 and opt.skipped_steps == 6 - applied
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**applied)
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_round_trip_resumes_exactly(flat):
    x, y = _data()
    model, opt = _mixed(flat)
    for _ in range(3):
        _train_step(model, opt, x, y)
    state = copy.deepcopy(opt.state_dict())
    assert all(m.dtype == torch.float32 for g in state["masters"] for m in g)
    model2, opt2 = _mixed(flat)
    opt2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    for _ in range(3):
        _train_step(model, opt, x, y)
        _train_step(model2, opt2, x, y)
    _assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert opt.state_dict()["scaler"] == opt2.state_dict()["scaler"]


def test_loading_another_models_state_is_refused_and_changes_nothing():
    _, opt = _mixed()
    other = model_to_half(nn.Linear(4, 2))
    other_opt = MixedPrecisionOptimizer(torch.optim.AdamW(other.parameters()))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="masters of another model"):
        opt.load_state_dict(other_opt.state_dict())
    _assert_state_equal(before, _snapshot(opt))
    with pytest.raises(
        ValueError, match="flat_master=True but this optimizer has flat_master=False"
    ):
        opt.load_state_dict({**opt.state_dict(), "flat_master": True})
    with pytest.raises(ValueError, match=r"missing \['masters'\]"):
        opt.load_state_dict({"optimizer": {}, "scaler": {}})


def test_existing_optimizer_state_moves_to_the_masters():
    model = model_to_half(_model())
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    F.cross_entropy(model(x.half()).float(), y).backward()
    inner.step()
    momentum = [inner.state[p]["momentum_buffer"].float() for p in model.parameters()]
    opt = MixedPrecisionOptimizer(inner)
    moved = [inner.state[m]["momentum_buffer"] for m in opt.master_params[0]]
    assert all(m.dtype == torch.float32 for m in moved)
    assert all(torch.equal(a, b) for a, b in zip(moved, momentum))
    assert not any(p in inner.state for p in model.parameters())


def test_added_param_group_gets_masters():
    model = model_to_half(_model())
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(list(model[0].parameters()), lr=1e-2))
    opt.add_param_group({"params": list(model[3].parameters()), "lr": 1e-3})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 1e-3
    assert all(m.dtype == torch.float32 for m in opt.param_groups[1]["params"])
    before = model[3].weight.detach().clone()
    x, y = _data()
    assert _train_step(model, opt, x, y)
    assert not torch.equal(before, model[3].weight)


def test_call_order_is_enforced():
    model, opt = _mixed()
    with pytest.raises(RuntimeError, match=r"no gradients to step on: call backward\(loss\)"):
        opt.step()
    x, y = _data()
    _train_step(model, opt, x, y)
    with pytest.raises(RuntimeError, match="no gradients to step on"):
        opt.step()  # twice without backward
    opt.backward(F.cross_entropy(model(x.half()).float(), y))
    opt.unscale_()
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        opt.unscale_()
    with pytest.raises(RuntimeError, match=r"call step\(\) before the next backward"):
        opt.backward(F.cross_entropy(model(x.half()).float(), y))
    assert opt.step()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda m: torch.optim.SGD(_model().parameters(), lr=0.1),
            ValueError,
            "holds no fp16/bf16 parameters",
        ),
        (lambda m: "sgd", TypeError, "expected a torch.optim.Optimizer"),
        (
            lambda m: MixedPrecisionOptimizer(torch.optim.SGD(m.parameters(), lr=0.1)),
            TypeError,
            "already a MixedPrecisionOptimizer",
        ),
    ],
)
def test_bad_optimizers_are_refused(make, error, message):
    model = model_to_half(_model())
    with pytest.raises(error, match=message):
        MixedPrecisionOptimizer(make(model))


@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, "1"])
def test_bad_clip_is_refused(clip):
    model = model_to_half(_model())
    with pytest.raises(ValueError, match="clip must be None or a positive finite max norm"):
        MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip=clip)


def test_closures_are_refused():
    _, opt = _mixed()
    with pytest.raises(TypeError, match="takes no closure"):
        opt.step(lambda: 0.0)


# -- edge cases, each failing before its fix -----------------------------------------
def _half_model():
    torch.manual_seed(0)
    return model_to_half(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 4, generator=g).half(), torch.randn(3, 2, generator=g)
    return ((model(x).float() - y) ** 2).mean()


@pytest.mark.parametrize("flat", [False, True])
def test_add_param_group_refuses_a_parameter_already_held(flat):
    # torch.optim refuses a parameter in two groups; a second master would step it twice
    # (and, flat, re-point its storage away from the first group's buffer).
    model = _half_model()
    opt = MixedPrecisionOptimizer(
        torch.optim.SGD(model[0].parameters(), lr=0.1), 8.0, flat_master=flat
    )
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": list(model.parameters())})
    assert len(opt.param_groups) == 1 and len(opt.model_params) == 1
    opt.add_param_group({"params": list(model[1:].parameters())})  # the new ones alone are fine
    assert sum(len(g) for g in opt.model_params) == len(list(model.parameters()))


def test_model_g2master_g_copies_fp32_grads_instead_of_aliasing_them():
    # The documented loop divides the master grads by the scale in place; with gradient
    # accumulation in the model grads, an aliased fp32 (norm layer) grad would be divided
    # twice while the half ones are divided once.
    model = _half_model()
    model_params, master_params = get_master([model])
    scale = 8.0
    (_loss(model, 0) * scale).backward()
    model_g2master_g(model_params, master_params)
    for group in master_params:
        for m in group:
            m.grad.div_(scale)
    (_loss(model, 1) * scale).backward()  # accumulates in the model grads
    model_g2master_g(model_params, master_params)

    reference = _half_model()
    ((_loss(reference, 0) + _loss(reference, 1)) * scale).backward()
    for p, m in zip(reference.parameters(), master_params[0]):
        assert m.grad is not p.grad
        torch.testing.assert_close(m.grad, p.grad.float(), rtol=1e-2, atol=1e-2)


def _adam_after_fp32_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ((model(torch.ones(3, 4)) - 1) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model_to_half(model), opt


def test_flat_master_keeps_the_state_of_steps_taken_before_wrapping():
    # The documented callback keeps "any optimizer state from a previous fit" when it
    # re-points the optimizer to the masters: flat masters too (fit in fp32, then to_fp16).
    results = []
    for flat in (False, True):
        model, inner = _adam_after_fp32_step()
        moments = [inner.state[p]["exp_avg"].clone() for p in model.parameters()]
        opt = MixedPrecisionOptimizer(inner, 8.0, flat_master=flat)
        if flat:
            (master,) = opt.master_params[0]
            state = opt.state[master]
            torch.testing.assert_close(
                state["exp_avg"], torch.cat([m.reshape(-1) for m in moments])
            )
            assert int(state["step"]) == 1
        opt.backward(_loss(model, 1))
        assert opt.step()
        results.append([m.detach().clone() for m in opt.master_params[0]])
    flat_values = results[1][0]
    torch.testing.assert_close(flat_values, torch.cat([m.reshape(-1) for m in results[0]]))


def test_flat_master_refuses_state_it_cannot_merge_and_changes_nothing():
    model, inner = _adam_after_fp32_step()
    first = next(iter(model.parameters()))
    inner.state.pop(first)  # a parameter that never had a gradient has no state
    before = dict(inner.state)
    with pytest.raises(ValueError, match="cannot be merged into one flat master"):
        MixedPrecisionOptimizer(inner, 8.0, flat_master=True)
    assert dict(inner.state) == before


@pytest.mark.parametrize("clip", [-1.0, 0.0, float("nan")])
def test_mixed_precision_refuses_a_bad_clip_when_built(tmp_path, clip):
    # Like the loss-scale options, a bad clip is refused at once, not at the first fit().
    with pytest.raises(ValueError, match="clip must be None or a positive finite max norm"):
        MixedPrecision(make_learner(tmp_path), clip=clip)


def test_flat_master_refuses_a_model_moved_after_the_optimizer_was_built():
    # .to(memory_format=...) re-points the conv weight and its grad away from the flat
    # buffers: the step used to train nothing there, silently.
    torch.manual_seed(0)
    model = model_to_half(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)))
    opt = MixedPrecisionOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), 8.0, flat_master=True
    )
    model.to(memory_format=torch.channels_last)
    opt.backward(model(torch.randn(2, 3, 4, 4).half()).float().pow(2).mean())
    with pytest.raises(RuntimeError, match="no longer lives in its flat_master buffer"):
        opt.step()


@pytest.mark.parametrize("wrapper", ["master", "autocast"])
def test_step_hooks_register_and_run_as_on_torch_optimizers(wrapper):
    # e.g. an EMA of the weights kept by a post hook; registering used to raise a TypeError
    # (a plain dict cannot be weakly referenced) and nothing would have run the hooks.
    from mixprec import AutocastOptimizer

    if wrapper == "master":
        model = _half_model()
        opt = MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8.0)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        opt = AutocastOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8.0)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    x = torch.randn(3, 4)
    opt.backward(model(x.half() if wrapper == "master" else x).float().sum())
    assert opt.step() is True
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove()
    opt.zero_grad()
    opt.backward(model(x.half() if wrapper == "master" else x).float().sum())
    opt.step()
    assert calls[2:] == [("post", opt)]


def test_to_fp32_then_to_fp16_flat_keeps_the_optimizer_state(tmp_path):
    learn = make_learner(tmp_path, layer_groups=True)
    learn.to_fp16(flat_master=True)
    learn.fit(1, 1e-2)
    before = {k: v.clone() for k, v in learn.opt.state[learn.opt.master_params[0][0]].items()}
    learn.to_fp32().to_fp16(flat_master=True)
    after = learn.opt.state[learn.opt.master_params[0][0]]
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_fused_zero_grad_mid_accumulation_frees_the_fp32_master_grads():
    from torch import nn

    from mixprec import MixedPrecisionOptimizer, model_to_half

    model = model_to_half(nn.Linear(4, 3))
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), 128.0, flat_master=True, fused=True
    )
    x = torch.randn(2, 4).half()
    for _ in range(2):  # the second backward moves the first one's grads into fp32 masters
        opt.backward(model(x).float().sum())
    assert any(m.grad is not None for g in opt.master_params for m in g)
    opt.zero_grad()
    assert all(m.grad is None for g in opt.master_params for m in g)
    opt.backward(model(x).float().sum())
    assert opt.step()


def test_the_automatic_fused_step_runs_the_wrapped_optimizers_step_hooks():
    """fused=None gives way to the wrapped optimizer's own step when hooks are registered on
    it, so they run on every applied step; an lr scheduler built on it does not warn."""
    model = _half_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1)
    opt = MixedPrecisionOptimizer(inner, 128.0)
    assert opt.fused  # AdamW: fused by default
    opt.backward(_loss(model, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        assert opt.step()
        sched.step()
    opt.zero_grad()
    calls = []
    handle = inner.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    for seed in (1, 2):
        opt.backward(_loss(model, seed))
        assert opt.step()
        opt.zero_grad()
    handle.remove()
    assert calls == [inner, inner]
    reference = _half_model()
    ref = MixedPrecisionOptimizer(torch.optim.AdamW(reference.parameters(), lr=1e-3), 128.0)
    ref.optimizer.param_groups[0]["lr"] = inner.param_groups[0]["lr"] * 10  # before StepLR
    for seed in (0, 1, 2):
        if seed == 1:
            ref.optimizer.param_groups[0]["lr"] = inner.param_groups[0]["lr"]
        ref.backward(_loss(reference, seed))
        ref.step()
        ref.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)  # the hooked steps are the same AdamW steps
