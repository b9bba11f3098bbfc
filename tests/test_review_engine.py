"""Edge cases of the engine found in review: each test failed before its fix."""

import pytest
import torch
from torch import nn

from learner_helpers import make_learner
from mixprec import (
    MixedPrecision,
    MixedPrecisionOptimizer,
    get_master,
    model_g2master_g,
    model_to_half,
)


def _model():
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
    model = _model()
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
    model = _model()
    model_params, master_params = get_master([model])
    scale = 8.0
    (_loss(model, 0) * scale).backward()
    model_g2master_g(model_params, master_params)
    for group in master_params:
        for m in group:
            m.grad.div_(scale)
    (_loss(model, 1) * scale).backward()  # accumulates in the model grads
    model_g2master_g(model_params, master_params)

    reference = _model()
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
        model = _model()
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
