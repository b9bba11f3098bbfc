"""MixedPrecisionOptimizer(opt, model=fp32_model, dtype=...): it converts the model itself and
takes the masters from the exact fp32 weights; a refusal leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionOptimizer, PrecisionPolicy, model_to_half


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _master_values(opt):
    out = []
    for params, masters in zip(opt.model_params, opt.master_params):
        if opt.flat_master:
            out += list(masters[0].detach().split([p.numel() for p in params]))
        else:
            out += [m.detach().reshape(-1) for m in masters]
    return out


@pytest.mark.parametrize("flat", [False, True])
def test_masters_are_the_exact_fp32_weights_and_the_model_is_converted(flat):
    model = _net()
    exact = [p.detach().clone().reshape(-1) for p in model.parameters()]
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = MixedPrecisionOptimizer(inner, model=model, dtype=torch.bfloat16, flat_master=flat)
    assert model[0].weight.dtype == model[3].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32  # the norm layer stays fp32
    assert all(torch.equal(m, e) for m, e in zip(_master_values(opt), exact))
    assert not torch.equal(model[0].weight.float().reshape(-1), exact[0])  # the model rounds
    held = [m for g in inner.param_groups for m in g["params"]]
    assert held == [m for group in opt.master_params for m in group]
    loss = model(torch.randn(4, 6, dtype=torch.bfloat16)).float().square().mean()
    opt.backward(loss)
    assert opt.step() and opt.dtype == torch.bfloat16


def test_the_half_model_path_starts_from_the_rounded_weights():
    model = _net()
    exact = [p.detach().clone().reshape(-1) for p in model.parameters()]
    model_to_half(model, torch.bfloat16)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
    masters = _master_values(opt)
    assert torch.equal(masters[0], model[0].weight.detach().float().reshape(-1))
    assert not torch.equal(masters[0], exact[0]) and torch.equal(masters[2], exact[2])


def test_keep_fp32_and_existing_optimizer_state_carry_over():
    model = _net()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    inner.step()  # a step taken in fp32: its moments move to the masters
    inner.zero_grad()
    moments = [inner.state[p]["exp_avg"].clone() for p in model.parameters()]
    exact = [p.detach().clone() for p in model.parameters()]
    opt = MixedPrecisionOptimizer(
        inner, model=model, dtype=torch.float16, keep_fp32=PrecisionPolicy().keep("3")
    )
    assert model[3].weight.dtype == torch.float32 and model[0].weight.dtype == torch.float16
    masters = [m for group in opt.master_params for m in group]
    assert all(torch.equal(m.detach(), e) for m, e in zip(masters, exact))
    assert all(torch.equal(inner.state[m]["exp_avg"], v) for m, v in zip(masters, moments))


def _refused(model, match, **kwargs):
    before = copy.deepcopy(model)
    inner = kwargs.pop("inner", None) or torch.optim.AdamW(model.parameters())
    with pytest.raises((ValueError, TypeError), match=match):
        MixedPrecisionOptimizer(inner, model=model, **kwargs)
    assert _same(model, before)  # still fp32, bit-identical
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_refused_conversion_leaves_the_model_exactly_as_it_was():
    model = _net()
    _refused(model, "dtype must be one of", dtype=torch.float32)
    _refused(model, "'haed' match no module", keep_fp32=PrecisionPolicy().keep("haed"))
    _refused(model, "clip must be", dtype=torch.bfloat16, clip=-1.0)
    _refused(model, "growth_factor", dtype=torch.bfloat16, growth_factor=0.5)
    _refused(model, "fused", inner=torch.optim.SGD(model.parameters(), lr=0.1), fused=True)
    other = nn.Linear(2, 2)
    foreign = torch.optim.AdamW([*model.parameters(), *other.parameters()])
    _refused(model, "not parameters of the model", inner=foreign)
    partial = torch.optim.AdamW(model.parameters())
    model[0].weight.grad = torch.ones_like(model[0].weight)
    partial.step()  # state for one parameter only: one flat master per group cannot merge it
    model[0].weight.grad = None
    _refused(model, "cannot be merged", inner=partial, flat_master=True)
    model.register_parameter("count", nn.Parameter(torch.tensor([3, 4]), requires_grad=False))
    _refused(model, "integer parameter", flat_master=True)


def test_an_fp32_optimizer_without_model_and_options_on_a_half_one_are_refused():
    model = _net()
    with pytest.raises(ValueError, match=r"no fp16/bf16 parameters.*model=model"):
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
    model_to_half(model)
    with pytest.raises(ValueError, match="already holds half parameters"):
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16)
