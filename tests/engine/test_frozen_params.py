"""Frozen parameters in the wrapped optimizer get no fp32 master (the LoRA habit of passing
`model.parameters()`); one unfrozen later gets its master from its current value."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mixprec import MixedPrecisionOptimizer


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    return model


def _step(model, opt):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
    opt.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    assert opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("kw", [{}, {"flat_master": True}, {"master": "split"}, {"fused": False}])
def test_frozen_parameters_get_no_master_and_stay_put(kw):
    model = _model()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        model=model,
        dtype=torch.bfloat16,
        **kw,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if kw.get("master") != "split":
        held = sum(m.numel() for g in opt.master_params for m in g)
        assert held == trainable == 16 * 4 + 4
    assert len(opt.master_values()) == 2
    frozen = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    _step(model, opt)
    _step(model, opt)
    assert all(
        torch.equal(a, p)
        for a, p in zip(frozen, (p for p in model.parameters() if not p.requires_grad))
    )
    assert len(opt.state) == (1 if kw.get("flat_master") else 2)  # the trainable ones only


@pytest.mark.parametrize("kw", [{}, {"master": "split"}])
def test_a_parameter_unfrozen_later_gets_its_master_from_its_current_value(kw):
    model = _model()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16, **kw
    )
    _step(model, opt)
    weight = model[0].weight
    weight.requires_grad_(True)
    value = weight.detach().float().clone()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
    opt.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    opt.unscale_()  # the master exists from here on, with this step's gradient
    assert torch.equal(opt.master_values()[id(weight)], value)
    assert opt.step()
    assert not torch.equal(weight.detach().float(), value)  # stepped from now on
    assert len(opt.master_values()) == 3


def test_a_flat_group_partly_unfrozen_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    opt = MixedPrecisionOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        dtype=torch.bfloat16,
        flat_master=True,
    )
    model[0].bias.requires_grad_(True)
    masters = [m.detach().clone() for g in opt.master_params for m in g]
    opt.backward(model(torch.randn(2, 4).bfloat16()).float().sum())
    with pytest.raises(ValueError, match=r"flat_master=True lays out param group 0 once"):
        opt.step()
    assert [m.numel() for g in opt.master_params for m in g] == [m.numel() for m in masters]
