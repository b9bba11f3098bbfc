"""`MixedPrecisionOptimizer.fp32_state_dict()`: the model's state dict with the exact fp32
masters, loadable by an fp32 copy of the model."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mixprec import MixedPrecisionOptimizer, model_to_half


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("kw", [{}, {"flat_master": True}, {"master": "split"}])
def test_fp32_state_dict_holds_the_exact_masters_under_the_model_keys(kw):
    model = _model()
    fp32_copy = copy.deepcopy(model)
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16, **kw
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(2):
        opt.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
        assert opt.step()
        opt.zero_grad()
    state = opt.fp32_state_dict()
    assert list(state) == list(model.state_dict())
    values = opt.master_values()
    for name, p in model.named_parameters():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], values[id(p)].reshape(p.shape))
        assert state[name].data_ptr() != values[id(p)].data_ptr()  # a copy, safe to keep
    assert torch.equal(state["1.running_mean"], model[1].running_mean)
    fp32_copy.load_state_dict(state)
    differs = [
        not torch.equal(a.float(), b) for a, b in zip(model.parameters(), fp32_copy.parameters())
    ]
    assert any(differs)  # the half weights are rounded; the fp32 copy has the masters


def test_fp32_state_dict_needs_the_model():
    model = model_to_half(_model(), torch.bfloat16)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"build the wrapper with model="):
        opt.fp32_state_dict()


def test_a_tied_parameter_is_one_tensor_under_each_name():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as a language model's input and output embeddings
    model = nn.Sequential(emb, head)
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters()), model=model, dtype=torch.bfloat16
    )
    state = opt.fp32_state_dict()
    assert state["0.weight"] is state["1.weight"]  # saved once (save_pretrained, torch.save)
    assert torch.equal(state["0.weight"], opt.master_values()[id(emb.weight)])
