"""Flat masters stepped through cache-sized views: the flat step's numbers and state."""

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.engine.flat_step import FlatViewStep

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-2}),
}


def _run(cls, kw, views: bool, steps: int = 5):
    torch.manual_seed(0)
    model = model_to_half(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)))
    groups = [
        {"params": model[0].parameters()},
        {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 5e-3},
    ]
    opt = MixedPrecisionOptimizer(cls(groups, **kw), 64.0, flat_master=True, fused=False)
    assert opt._view_step is not None
    if views:  # views of 7 elements: many per group, not aligned to the parameters
        numels = [sum(p.numel() for p in ps) for ps in opt.model_params]
        opt._view_step = FlatViewStep(opt.optimizer, numels, chunk=7)
    else:
        opt._view_step = None
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 8, generator=g).half()
        loss = model(x).float().square().mean()
        opt.backward(loss * float("inf") if i == 2 else loss)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_views_give_the_flat_step_bit_for_bit_with_the_state_kept_flat(name):
    cls, kw = OPTIMIZERS[name]
    a, b = _run(cls, kw, views=False), _run(cls, kw, views=True)
    for ma, mb in zip(a.master_params, b.master_params):
        assert torch.equal(ma[0], mb[0])
    sa, sb = a.state_dict()["optimizer"]["state"], b.state_dict()["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) == [0, 1]
    for k in sa:
        assert sorted(sa[k]) == sorted(sb[k])
        for key, va in sa[k].items():
            vb = sb[k][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (name, key)
            if torch.is_tensor(va) and va.dim():  # per-element state stays one flat tensor
                assert vb.shape == a.master_params[k][0].shape
    assert not any(t.dim() == 1 and t.numel() == 7 for t in b.optimizer.state)  # views dropped


def test_an_optimizer_that_is_not_elementwise_steps_flat():
    class Custom(torch.optim.SGD):
        pass

    torch.manual_seed(0)
    model = model_to_half(nn.Linear(4, 4))
    opt = MixedPrecisionOptimizer(Custom(model.parameters(), lr=0.1), flat_master=True)
    assert opt._view_step is None
