"""Edge cases of the engine found in review: each test failed before its fix."""

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionOptimizer, get_master, model_g2master_g, model_to_half


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
