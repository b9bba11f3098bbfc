"""Parameters mixed precision cannot step (sparse gradients, complex values) are refused with
a clear error in every mode, before anything changes."""

import pytest
import torch
from torch import nn

from mixprec import AutocastOptimizer, MixedPrecisionOptimizer


def _engine(mode, module):
    inner = torch.optim.SGD(module.parameters(), lr=0.1)
    if mode == "autocast":
        return AutocastOptimizer(inner, dtype=torch.bfloat16)
    return MixedPrecisionOptimizer(inner, fused=False if mode == "per tensor" else None)


@pytest.mark.parametrize("mode", ["autocast", "per tensor", "default"])
def test_sparse_gradients_are_refused_naming_the_fix(mode):
    emb = nn.Embedding(10, 4, sparse=True)
    if mode != "autocast":
        emb = emb.bfloat16()
    opt = _engine(mode, emb)
    before = emb.weight.detach().clone()
    opt.backward(emb(torch.tensor([1, 2])).float().sum())
    with pytest.raises(TypeError, match=r"sparse gradients .* Build them with sparse=False"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_complex_parameters_are_refused_in_the_autocast_mode():
    module = nn.Linear(2, 2)
    module.weight = nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"complex parameter.*view_as_real"):
        AutocastOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), dtype=torch.bfloat16)
