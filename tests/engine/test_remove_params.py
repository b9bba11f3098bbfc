"""`remove_params(params)` of both engines: the parameters leave with their masters and
optimizer state, the others step on exactly as if nothing had been removed; a refusal
changes nothing."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers.learner import assert_identical
from mixprec import AutocastOptimizer, MixedPrecisionOptimizer

BF16 = torch.bfloat16
ENGINES = {
    "per_tensor": {"fused": None},
    "unfused": {"fused": False},
    "flat": {"flat_master": True},
    "flat_fused": {"flat_master": True, "fused": True},
    "split": {"master": "split"},
    "autocast": None,
}


def _build(engine: str, optimizer=torch.optim.AdamW):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    inner = optimizer(model.parameters(), lr=1e-2)
    if engine == "autocast":
        return model, AutocastOptimizer(inner, 256.0, dtype=BF16, model=model)
    opt = MixedPrecisionOptimizer(inner, 256.0, model=model, dtype=BF16, **ENGINES[engine])
    return model, opt


def _step(model, opt, engine: str, head: bool = True) -> None:
    g = torch.Generator().manual_seed(int(opt.scaler.steps))
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    dtype = torch.float32 if engine == "autocast" else BF16
    with torch.autocast("cpu", dtype=BF16, enabled=engine == "autocast"):
        out = model[:3](x.to(dtype))
        out = model[3](out) if head else out[:, :3] * 0 + out.sum(1, keepdim=True)
    opt.backward(F.cross_entropy(out.float(), y))
    assert opt.step()
    opt.zero_grad()


def _values(opt) -> dict[int, torch.Tensor]:
    if isinstance(opt, MixedPrecisionOptimizer):
        return {k: v.clone() for k, v in opt.master_values().items()}
    return {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_removed_params_leave_and_the_others_step_as_before(engine):
    kept_model, kept = _build(engine)  # never removes anything
    model, opt = _build(engine)
    for _ in range(2):
        _step(kept_model, kept, engine)
        _step(model, opt, engine)
    head = list(model[3].parameters())
    head_before = [p.detach().clone() for p in head]
    opt.remove_params(head)
    held = getattr(opt, "model_params", [g["params"] for g in opt.param_groups])
    assert not any(p is q for g in held for p in g for q in head)
    inner = getattr(opt, "optimizer", opt)
    stepped = {id(t) for g in inner.param_groups for t in g["params"]}
    assert {id(t) for t in inner.state} <= stepped
    assert len(inner.param_groups) == len(kept.param_groups)  # an emptied group stays
    for _ in range(2):  # the body alone now: the head gets no gradient in either
        _step(kept_model, kept, engine, head=False)
        _step(model, opt, engine, head=False)
    body = [id(p) for p in model[:3].parameters()]
    kept_body = [id(p) for p in kept_model[:3].parameters()]
    ours, theirs = _values(opt), _values(kept)
    for a, b in zip(body, kept_body):
        assert torch.equal(ours[a], theirs[b])
    for p, q in zip(model[:3].parameters(), kept_model[:3].parameters()):
        assert torch.equal(p, q)
    for p, before in zip(head, head_before):
        assert torch.equal(p.detach(), before)  # no longer stepped
    if engine.startswith("flat"):  # out of the flat buffers: the body's writes miss it
        body_storage = model[0].weight.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() != body_storage for p in head)


def _snapshot(opt) -> dict:
    inner = getattr(opt, "optimizer", opt)
    return {
        "values": list(_values(opt).values()),
        "groups": [len(g["params"]) for g in inner.param_groups],
        "state": [
            {k: v.clone() for k, v in inner.state[t].items()}
            for g in inner.param_groups
            for t in g["params"]
            if t in inner.state
        ],
    }


@pytest.mark.parametrize("engine", ["per_tensor", "flat", "split", "autocast"])
def test_remove_params_refuses_before_changing_anything(engine):
    model, opt = _build(engine)
    _step(model, opt, engine)
    before = _snapshot(opt)
    foreign = nn.Linear(2, 2).weight
    with pytest.raises(ValueError, match=r"not held by the optimizer"):
        opt.remove_params([model[3].weight, foreign])
    with pytest.raises(TypeError, match=r"must be tensors"):
        opt.remove_params([model[3].weight, "bias"])
    out = model(torch.randn(2, 6).to(torch.float32 if engine == "autocast" else BF16))
    opt.backward(out.float().sum())
    with pytest.raises(RuntimeError, match=r"between backward\(\) and step\(\)"):
        opt.remove_params([model[3].weight])
    opt.zero_grad()
    assert_identical(_snapshot(opt), before)
