"""Large masters stepped through cache-sized views: the whole-tensor step's numbers and state."""

import pytest
import torch
from torch import nn

from mixprec import AutocastOptimizer, MixedPrecisionOptimizer, model_to_half
from mixprec.engine.view_step import ViewStep

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-2}),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": model[0].parameters()},
        {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 5e-3},
    ]


def _run(cls, kw, views: bool, flat: bool, steps: int = 5):
    model = model_to_half(_model())
    opt = MixedPrecisionOptimizer(cls(_groups(model), **kw), 64.0, flat_master=flat, fused=False)
    assert isinstance(opt.update.views, ViewStep)
    # views of 7 elements: many per tensor, not aligned to the parameters; or none at all
    opt.update.views = ViewStep(opt.optimizer, chunk=7) if views else None
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 8, generator=g).half()
        loss = model(x).float().square().mean()
        opt.backward(loss * float("inf") if i == 2 else loss)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per_tensor"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_views_give_the_whole_step_bit_for_bit_with_the_state_kept_whole(name, flat):
    cls, kw = OPTIMIZERS[name]
    a, b = _run(cls, kw, views=False, flat=flat), _run(cls, kw, views=True, flat=flat)
    masters_a = [m for g in a.master_params for m in g]
    masters_b = [m for g in b.master_params for m in g]
    for ma, mb in zip(masters_a, masters_b):
        assert torch.equal(ma, mb)
    sa, sb = a.state_dict()["optimizer"]["state"], b.state_dict()["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) == list(range(len(masters_a)))
    for k in sa:
        assert sorted(sa[k]) == sorted(sb[k])
        for key, va in sa[k].items():
            vb = sb[k][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (name, key)
            if torch.is_tensor(va) and va.dim():  # per-element state stays one tensor
                assert vb.shape == masters_a[k].shape
    assert len(b.optimizer.state) == len(masters_b)  # the views' entries are gone


def test_an_autocast_optimizer_steps_its_fp32_parameters_through_views_bit_for_bit():
    results = []
    for views in (False, True):
        model = _model()
        opt = AutocastOptimizer(torch.optim.AdamW(_groups(model), lr=1e-2), 64.0, fused=False)
        assert isinstance(opt.update.views, ViewStep)
        opt.update.views = ViewStep(opt.optimizer, chunk=7) if views else None
        for i in range(4):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
            opt.backward(model(x).square().mean())
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_step_hooks_and_odd_layouts_see_the_parameters_themselves():
    torch.manual_seed(0)
    conv = model_to_half(nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    lin = model_to_half(nn.Linear(6, 5))
    inner = torch.optim.Adam([*conv.parameters(), *lin.parameters()], lr=1e-2)
    opt = MixedPrecisionOptimizer(inner, 8.0, fused=False)
    opt.update.views = ViewStep(opt.optimizer, chunk=4)
    seen: list[list[tuple[int, ...]]] = []
    for hooked in (False, True, True):
        out = conv(torch.randn(1, 3, 5, 5).half().to(memory_format=torch.channels_last))
        opt.backward(out.float().sum() + lin(torch.randn(2, 6).half()).float().sum())
        if hooked and not seen:
            inner.register_step_pre_hook(
                lambda o, a, k: seen.append([tuple(p.shape) for p in o.param_groups[0]["params"]])
            )
        assert opt.step()
        opt.zero_grad()
    masters = [tuple(m.shape) for m in opt.master_params[0]]
    assert seen == [masters, masters]  # the hook saw whole masters, never views
    assert not opt.master_params[0][0].is_contiguous()  # channels_last, stepped whole


def test_an_optimizer_that_is_not_elementwise_steps_whole():
    class Custom(torch.optim.SGD):
        pass

    torch.manual_seed(0)
    model = model_to_half(nn.Linear(4, 4))
    opt = MixedPrecisionOptimizer(Custom(model.parameters(), lr=0.1), flat_master=True)
    assert opt.update.views is None
