import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mixprec import MixedPrecisionOptimizer, model_to_half
from tensor_helpers import tensors_in


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _mixed(flat=False, opt=torch.optim.AdamW, loss_scale="dynamic", **kw):
    model = model_to_half(_model())
    return model, MixedPrecisionOptimizer(
        opt(model.parameters(), lr=1e-2), loss_scale, flat_master=flat, **kw
    )


def _train_step(model, opt, x, y):
    loss = F.cross_entropy(model(x.half()).float(), y)
    opt.backward(loss)
    applied = opt.step()
    opt.zero_grad()
    return applied


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_state_equal(a, b):
    ta = [t for t in tensors_in(a)]
    tb = [t for t in tensors_in(b)]
    assert len(ta) == len(tb) > 0
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("flat", [False, True])
def test_an_inf_at_step_k_skips_it_and_changes_nothing(flat):
    model, opt = _mixed(flat, loss_scale=256.0)
    x, y = _data()
    for _ in range(3):
        assert _train_step(model, opt, x, y)
    before, weights = _snapshot(opt), copy.deepcopy(model.state_dict())
    loss = F.cross_entropy(model(x.half()).float(), y) * torch.tensor(math.inf)
    opt.backward(loss)
    assert opt.step() is False
    after = _snapshot(opt)
    _assert_state_equal(before, after)  # every tensor: masters, moments, step counts
    assert after["scaler"] == {
        **before["scaler"],
        "steps": 4,
        "skipped_steps": 1,
        "consecutive_skips": 1,
        "floor_overflows": 1,
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert opt.skipped_steps == 1 and opt.loss_scale == 256.0
    assert _train_step(model, opt, x, y)  # and training goes on


def test_dynamic_scale_backs_off_on_overflow():
    model, opt = _mixed(loss_scale="dynamic", init_scale=2.0**20)
    x, y = _data()
    # 2**20 * a loss ~1 overflows fp16 grads (max 65504)
    applied = [_train_step(model, opt, x, y) for _ in range(8)]
    assert not applied[0] and applied[-1]
    assert opt.loss_scale < 2.0**20 and opt.skipped_steps == applied.count(False)


def test_one_sgd_step_matches_the_fp32_reference_within_fp16_rounding():
    x, y = _data()
    ref = _model()
    half = model_to_half(copy.deepcopy(ref))
    ref_values = [p.detach().half().float() for p in ref.parameters()]  # same starting point
    with torch.no_grad():
        for p, v in zip(ref.parameters(), ref_values):
            p.copy_(v)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    opt = MixedPrecisionOptimizer(torch.optim.SGD(half.parameters(), lr=0.1), 1024.0)
    opt.backward(F.cross_entropy(half(x.half()).float(), y))
    assert opt.step()
    for p_ref, master, p in zip(ref.parameters(), opt.master_params[0], half.parameters()):
        assert torch.allclose(master, p_ref, rtol=0, atol=2e-3)
        assert torch.equal(p.detach(), master.detach().to(p.dtype))


@pytest.mark.parametrize("flat", [False, True])
def test_backward_twice_accumulates_in_fp32(flat):
    p = nn.Parameter(torch.zeros(2).half())
    opt = MixedPrecisionOptimizer(torch.optim.SGD([p], lr=1.0), 2.0**15, flat_master=flat)
    # each micro-batch gives a scaled grad of 2**15 * 1.5 = 49152 (< 65504); the sum overflows half
    for _ in range(2):
        opt.backward((p.float() * 1.5).sum())
    opt.unscale_()
    grads = opt.master_params[0][0].grad
    assert grads.dtype == torch.float32 and grads.tolist() == [3.0, 3.0]
    assert opt.step() is True
    assert p.tolist() == [-3.0, -3.0]


@pytest.mark.parametrize("flat", [False, True])
def test_flat_and_per_tensor_masters_train_identically(flat):
    x, y = _data()
    runs = []
    for flat_master in (False, True):
        model, opt = _mixed(flat_master)
        for _ in range(5):
            _train_step(model, opt, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_clip_uses_one_global_norm_over_unscaled_master_grads():
    x, y = _data()
    model, opt = _mixed(opt=torch.optim.SGD, loss_scale=512.0, clip=0.05)
    opt.backward(F.cross_entropy(model(x.half()).float(), y))
    model_grads = [p.grad.float() / 512.0 for p in model.parameters()]
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in model_grads]))
    opt.unscale_()
    assert torch.allclose(opt.last_grad_norm, expected_norm, rtol=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([m.grad.norm() for m in opt.master_params[0]]))
    assert expected_norm > 0.05 and torch.allclose(clipped, torch.tensor(0.05), rtol=1e-4)
    assert opt.step()


def test_lr_schedulers_drive_it_and_can_be_gated_on_applied_steps():
    model, opt = _mixed(loss_scale="dynamic", init_scale=2.0**20)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    applied = 0
    for _ in range(6):
        if _train_step(model, opt, x, y):
            sched.step()
            applied += 1
    assert 0 < applied < 6 and opt.skipped_steps == 6 - applied
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**applied)
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("flat", [False, True])
def test_state_dict_round_trip_resumes_exactly(flat):
    x, y = _data()
    model, opt = _mixed(flat)
    for _ in range(3):
        _train_step(model, opt, x, y)
    state = copy.deepcopy(opt.state_dict())
    assert all(m.dtype == torch.float32 for g in state["masters"] for m in g)
    model2, opt2 = _mixed(flat)
    opt2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    for _ in range(3):
        _train_step(model, opt, x, y)
        _train_step(model2, opt2, x, y)
    _assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert opt.state_dict()["scaler"] == opt2.state_dict()["scaler"]


def test_loading_another_models_state_is_refused_and_changes_nothing():
    _, opt = _mixed()
    other = model_to_half(nn.Linear(4, 2))
    other_opt = MixedPrecisionOptimizer(torch.optim.AdamW(other.parameters()))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="masters of another model"):
        opt.load_state_dict(other_opt.state_dict())
    _assert_state_equal(before, _snapshot(opt))
    with pytest.raises(
        ValueError, match="flat_master=True but this optimizer has flat_master=False"
    ):
        opt.load_state_dict({**opt.state_dict(), "flat_master": True})
    with pytest.raises(ValueError, match=r"missing \['masters'\]"):
        opt.load_state_dict({"optimizer": {}, "scaler": {}})


def test_existing_optimizer_state_moves_to_the_masters():
    model = model_to_half(_model())
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    F.cross_entropy(model(x.half()).float(), y).backward()
    inner.step()
    momentum = [inner.state[p]["momentum_buffer"].float() for p in model.parameters()]
    opt = MixedPrecisionOptimizer(inner)
    moved = [inner.state[m]["momentum_buffer"] for m in opt.master_params[0]]
    assert all(m.dtype == torch.float32 for m in moved)
    assert all(torch.equal(a, b) for a, b in zip(moved, momentum))
    assert not any(p in inner.state for p in model.parameters())


def test_added_param_group_gets_masters():
    model = model_to_half(_model())
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(list(model[0].parameters()), lr=1e-2))
    opt.add_param_group({"params": list(model[3].parameters()), "lr": 1e-3})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 1e-3
    assert all(m.dtype == torch.float32 for m in opt.param_groups[1]["params"])
    before = model[3].weight.detach().clone()
    x, y = _data()
    assert _train_step(model, opt, x, y)
    assert not torch.equal(before, model[3].weight)


def test_call_order_is_enforced():
    model, opt = _mixed()
    with pytest.raises(RuntimeError, match=r"no gradients to step on: call backward\(loss\)"):
        opt.step()
    x, y = _data()
    _train_step(model, opt, x, y)
    with pytest.raises(RuntimeError, match="no gradients to step on"):
        opt.step()  # twice without backward
    opt.backward(F.cross_entropy(model(x.half()).float(), y))
    opt.unscale_()
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        opt.unscale_()
    with pytest.raises(RuntimeError, match=r"call step\(\) before the next backward"):
        opt.backward(F.cross_entropy(model(x.half()).float(), y))
    assert opt.step()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda m: torch.optim.SGD(_model().parameters(), lr=0.1),
            ValueError,
            "holds no fp16/bf16 parameters",
        ),
        (lambda m: "sgd", TypeError, "expected a torch.optim.Optimizer"),
        (
            lambda m: MixedPrecisionOptimizer(torch.optim.SGD(m.parameters(), lr=0.1)),
            TypeError,
            "already a MixedPrecisionOptimizer",
        ),
    ],
)
def test_bad_optimizers_are_refused(make, error, message):
    model = model_to_half(_model())
    with pytest.raises(error, match=message):
        MixedPrecisionOptimizer(make(model))


@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, "1"])
def test_bad_clip_is_refused(clip):
    model = model_to_half(_model())
    with pytest.raises(ValueError, match="clip must be None or a positive finite max norm"):
        MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip=clip)


def test_closures_are_refused():
    _, opt = _mixed()
    with pytest.raises(TypeError, match="takes no closure"):
        opt.step(lambda: 0.0)
