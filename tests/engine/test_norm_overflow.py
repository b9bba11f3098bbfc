"""Finite gradients whose global norm overflows fp32 (bf16 grads of ~1e25): clipping cannot
scale them, so every path skips the step and says why, instead of applying it unclipped."""

import copy

import pytest
import torch
from torch import nn

from mixprec import AutocastOptimizer, LossScaler, MixedPrecisionOptimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def _huge_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e25)  # finite in bf16 and fp32; squares overflow


CASES = {
    "sgd": (torch.optim.SGD, {}),
    "adamw unfused": (torch.optim.AdamW, {"fused": False}),
    "adamw fused": (torch.optim.AdamW, {}),
    "adamw flat": (torch.optim.AdamW, {"flat_master": True}),
    "split": (torch.optim.AdamW, {"master": "split"}),
}


@pytest.mark.parametrize("case", CASES)
def test_an_overflowing_norm_is_skipped_and_reported(case):
    opt_cls, kw = CASES[case]
    model = _model()
    opt = MixedPrecisionOptimizer(
        opt_cls(model.parameters(), lr=1e-3), 1.0, model=model, dtype=torch.bfloat16,
        clip=1.0, **kw,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.scale_loss(torch.zeros((), requires_grad=True))  # a backward of this step
    _huge_grads(model)
    assert not opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state_dict()["optimizer"]["state"] == state["optimizer"]["state"]
    assert not torch.isfinite(opt.last_grad_norm)
    assert opt.last_overflow.norm_overflow
    assert "global norm overflows fp32" in str(opt.last_overflow)


@pytest.mark.parametrize("fused", [False, None])
def test_the_autocast_mode_skips_it_too(fused):
    model = _model()
    opt = AutocastOptimizer(
        torch.optim.AdamW(model.parameters()), 1.0, dtype=torch.bfloat16, clip=1.0, fused=fused
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt.scale_loss(torch.zeros((), requires_grad=True))
    _huge_grads(model)
    assert not opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert "global norm overflows fp32" in str(opt.last_overflow)


def test_fsdp_scaled_step_skips_it_too():
    fsdp = pytest.importorskip("mixprec.parallel.fsdp")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    _huge_grads(model)
    assert not fsdp.scaled_step(opt, LossScaler(1.0), clip=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
