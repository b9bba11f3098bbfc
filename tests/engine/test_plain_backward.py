"""A plain `loss.backward()` (what HF Trainer and Accelerate call) with a mixprec optimizer:
the gradients are unscaled, the step takes them as they are, checks and skips as usual."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mixprec import AutocastOptimizer, MixedPrecisionOptimizer, StepState


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _wrapped(layout, loss_scale=2.0**10):
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if layout == "autocast":
        return model, AutocastOptimizer(inner, loss_scale, dtype=torch.bfloat16)
    kw = {"flat_master": True} if layout == "flat" else {}
    if layout == "split":
        kw = {"master": "split"}
    if layout == "unfused":
        kw = {"fused": False}
    return model, MixedPrecisionOptimizer(
        inner, loss_scale, model=model, dtype=torch.bfloat16, **kw
    )


def _loss(model, opt, x, y):
    if isinstance(opt, AutocastOptimizer):
        with opt.autocast():
            return F.cross_entropy(model(x).float(), y)
    return F.cross_entropy(model(x.bfloat16()).float(), y)


LAYOUTS = ["tensors", "flat", "split", "unfused", "autocast"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_backward_steps_as_the_scaled_backward_does(layout):
    x, y = _data()
    runs = []
    for plain in (False, True):
        model, opt = _wrapped(layout)
        for _ in range(3):
            loss = _loss(model, opt, x, y)
            if plain:
                loss.backward()
            else:
                opt.backward(loss)
            assert opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        # the scale 2^10 and its inverse are exact: the same update bit for bit
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_backward_with_an_inf_is_skipped_and_counted(layout):
    x, y = _data()
    model, opt = _wrapped(layout)
    loss = _loss(model, opt, x, y)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    assert not opt.step()
    assert opt.step_was_skipped and opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state_dict()["optimizer"]["state"] == state["optimizer"]["state"] == {}


def test_step_without_any_gradient_names_the_expected_order():
    _, opt = _wrapped("tensors")
    with pytest.raises(RuntimeError, match=r"no gradients to step on.*Expected order"):
        opt.step()
    assert opt.step_state is StepState.READY


def test_unscale_twice_names_the_expected_order():
    x, y = _data()
    model, opt = _wrapped("tensors")
    opt.backward(_loss(model, opt, x, y))
    opt.unscale_()
    assert opt.step_state is StepState.UNSCALED
    with pytest.raises(RuntimeError, match=r"already been called.*Expected order"):
        opt.unscale_()
    with pytest.raises(RuntimeError, match=r"call step\(\) before the next backward"):
        opt.scale_loss(_loss(model, opt, x, y))
    assert opt.step()
    assert opt.step_state is StepState.READY


@pytest.mark.parametrize("layout", ["tensors", "flat", "autocast"])
def test_clip_grad_norm_returns_the_unscaled_norm_and_clips_the_fp32_grads(layout):
    x, y = _data()
    model, opt = _wrapped(layout)
    ref = copy.deepcopy(_model())
    F.cross_entropy(ref(x), y).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    opt.backward(_loss(model, opt, x, y))
    norm = opt.clip_grad_norm_(expected.item() / 4)
    torch.testing.assert_close(norm, expected, rtol=2e-2, atol=0)  # bf16 forward and backward
    grads = opt._fp32_grads()
    clipped = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(clipped, expected / 4, rtol=2e-2, atol=0)
    assert opt.step()
