"""Overflow forensics: a skipped step's report names the parameters with inf/nan gradients,
built only after the overflow was seen; the persistent-overflow error names them too."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mixprec.engine.optimizer as mpo
from helpers.dispatch import OpRecorder
from helpers.learner import make_learner
from mixprec import Callback, MixedPrecisionOptimizer, master2model, model_to_half
from mixprec.engine.forensics import (
    GradFault,
    OverflowReport,
    clip_grad_norm_if_finite_,
    naming_overflow,
    param_names,
)

PATHS = {
    "per-tensor": {},
    "flat": {"flat_master": True},
    "fused": {"fused": True},
    "fused flat clip": {"fused": True, "flat_master": True, "clip": 1.0},
    "clip": {"clip": 1.0},
}


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
    return model_to_half(nn.Sequential(nn.ModuleDict({"encoder": encoder}), nn.Linear(8, 2)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _setup(sgd: bool = False, **options):
    model = model_to_half(_Net())
    inner = (  # SGD's foreach step syncs and allocates nothing, so what is counted is ours
        torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
        if sgd
        else torch.optim.AdamW(model.parameters())
    )
    opt = MixedPrecisionOptimizer(inner, 1024.0, model=model, floor_patience=3, **options)
    return model, opt


def _backward(model, opt, poison=()):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).half()
    opt.backward(F.cross_entropy(model(x).float(), torch.tensor([0, 1, 0, 1])))
    with torch.no_grad():
        for name, index, value in poison:
            dict(model.named_parameters())[name].grad.view(-1)[index] = value


@pytest.mark.parametrize("options", PATHS.values(), ids=PATHS.keys())
def test_a_skipped_step_names_the_parameters_with_inf_nan_gradients(options):
    model, opt = _setup(**options)
    _backward(model, opt)
    assert opt.step() and opt.last_overflow is None
    opt.zero_grad()
    poison = [("encoder.0.weight", 3, math.inf), ("encoder.0.weight", 5, math.nan)]
    _backward(model, opt, [*poison, ("head.bias", 1, -math.inf)])
    assert not opt.step()
    report = opt.last_overflow
    assert report.step == 1 and report.loss_scale == 1024.0
    assert report.names == ["encoder.0.weight", "head.bias"]
    assert report.faults[0] == GradFault("encoder.0.weight", (8, 4), nan=1, inf=1)
    assert report.faults[1] == GradFault("head.bias", (2,), nan=0, inf=1)
    assert str(report) == (
        "step 1 (counted from 0; loss scale 1024.0): inf/nan gradients in 2 parameter(s): "
        "encoder.0.weight (1 nan, 1 inf of 32), head.bias (1 inf of 2)"
    )
    opt.zero_grad()
    _backward(model, opt)
    assert opt.step() and opt.last_overflow is report  # kept until the next skip


@pytest.mark.parametrize("options", PATHS.values(), ids=PATHS.keys())
def test_the_persistent_overflow_error_names_the_parameters(options):
    model, opt = _setup(**options)
    with pytest.raises(
        FloatingPointError,
        match=r"3 consecutive steps at the static loss scale 1024\.0.*"
        r"The last skipped step, step 2 \(counted from 0; loss scale 1024\.0\): inf/nan gradients in 1 "
        r"parameter\(s\): encoder\.1\.weight \(1 nan of 8\)",
    ):
        for _ in range(3):
            _backward(model, opt, [("encoder.1.weight", 0, math.nan)])
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("flat", [False, True])
def test_clean_steps_pay_nothing_for_forensics(flat):
    model, opt = _setup(sgd=True, flat_master=flat)
    for _ in range(2):
        _backward(model, opt)
        opt.step()
        opt.zero_grad()
    _backward(model, opt)
    with OpRecorder() as clean:
        assert opt.step()
    assert clean.host_syncs == 1 and clean.allocations == []
    assert not {"isnan", "isinf"} & set(clean.ops)
    opt.zero_grad()
    _backward(model, opt, [("head.weight", 0, math.inf)])
    with OpRecorder() as skipped:
        assert not opt.step()
    assert {"isnan", "isinf"} <= set(skipped.ops)  # counted only once the step overflowed


def test_without_a_model_parameters_are_named_by_their_place():
    model = model_to_half(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
    opt = MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8.0)
    opt.backward(model(torch.ones(2, 3).half()).float().sum())
    model[1].weight.grad[0, 2] = math.inf
    assert not opt.step()
    assert opt.last_overflow.names == ["param_groups[0][2]"]


def test_a_rank_that_saw_no_inf_says_another_rank_overflowed(monkeypatch):
    model, opt = _setup()
    monkeypatch.setattr(
        mpo.MixedPrecisionOptimizer, "_all_reduce_overflow", lambda s, f: f.fill_(1.0)
    )
    _backward(model, opt)
    assert not opt.step()
    assert opt.last_overflow.faults == ()
    assert "no inf/nan in this process's gradients; another rank's" in str(opt.last_overflow)


def test_clipping_leaves_an_overflowing_steps_gradients_where_they_were():
    grads = [torch.tensor([3.0, math.nan]), torch.tensor([4.0, 0.0])]
    params = [nn.Parameter(torch.zeros(2)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = clip_grad_norm_if_finite_(params, 1.0)
    assert norm.isnan() and params[0].grad[0] == 3.0 and params[1].grad.tolist() == [4.0, 0.0]
    torch_params = [nn.Parameter(torch.zeros(2)) for _ in grads]
    for p, g in zip(torch_params, grads):
        p.grad = g.clone()
    nn.utils.clip_grad_norm_(torch_params, 1.0, foreach=True)
    assert torch_params[1].grad.isnan().all()  # torch's would have blamed every parameter
    params[0].grad = torch.tensor([3.0, 0.0])  # finite: the same numbers as torch's
    torch_params[0].grad, torch_params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0])
    assert clip_grad_norm_if_finite_(params, 1.0) == nn.utils.clip_grad_norm_(torch_params, 1.0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, torch_params))


def test_the_learner_names_parameters_by_their_module_names(tmp_path):
    class Poison(Callback):
        def on_backward_end(self, learn, iteration, **kwargs):
            if iteration == 2:
                learn.model[3].weight.grad[1, 1] = math.inf

    learn = make_learner(tmp_path, callbacks=[Poison()]).to_fp16()
    learn.fit(1)
    assert learn.recorder.skipped == [False, False, True, False]
    assert learn.opt.last_overflow.names == ["3.weight"] and learn.opt.last_overflow.step == 2


def test_naming_overflow_adds_the_report_to_floating_point_errors_only():
    report = OverflowReport(4, 2.0, (GradFault("w", (2,), 0, 1),))
    with (
        pytest.raises(FloatingPointError, match=r"^boom The last skipped step, step 4"),
        naming_overflow(report),
    ):
        raise FloatingPointError("boom")
    with pytest.raises(ValueError, match=r"^other$"), naming_overflow(report):
        raise ValueError("other")
    with pytest.raises(FloatingPointError, match=r"^boom$"), naming_overflow(None):
        raise FloatingPointError("boom")


def test_param_names_unwraps_and_checks():
    model = _encoder()
    assert list(param_names(model).values())[:2] == ["0.encoder.0.weight", "0.encoder.0.bias"]
    with pytest.raises(TypeError, match=r"model must be the nn\.Module whose parameters"):
        param_names("model")


@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
def test_a_master_past_the_fp16_range_is_named_as_the_weight_not_the_gradients(flat):
    model, opt = _setup(flat_master=flat)
    _backward(model, opt)
    assert opt.step()
    opt.zero_grad()
    with torch.no_grad():  # as if the update had carried it there: the half copy is inf
        master = opt.master_params[0][0]
        master.view(-1)[0] = 7e4
        master2model(opt.model_params, opt.master_params, flat)
    assert model.encoder[0].weight.isinf().any()
    _backward(model, opt)
    with pytest.warns(
        RuntimeWarning,
        match=r"encoder.0.weight \(its fp32 master reaches \|w\| = 7e\+04, beyond the half range: 1 value\(s\) are inf",
    ):
        assert not opt.step()
    assert [w.name for w in opt.last_overflow.weights] == ["encoder.0.weight"]
    assert "not finite WEIGHTS, the cause: encoder.0.weight" in str(opt.last_overflow)


def test_a_nan_weight_is_reported_as_a_nan_weight():
    model, opt = _setup()
    with torch.no_grad():
        opt.master_params[0][4].view(-1)[1] = math.nan  # head.weight: its master and half copy
        master2model(opt.model_params, opt.master_params)
    _backward(model, opt)
    with pytest.warns(RuntimeWarning, match=r"head.weight \(the weight itself holds 1 nan\)"):
        assert not opt.step()
    assert opt.last_overflow.weights[0].name == "head.weight"


def test_autocast_mode_names_the_overflowing_layer_too():
    from mixprec import AutocastOptimizer

    torch.manual_seed(0)
    model = _Net()
    opt = AutocastOptimizer(
        torch.optim.AdamW(model.parameters()), 1024.0, dtype=torch.bfloat16, model=model
    )
    x = torch.randn(4, 4)
    with opt.autocast():
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    opt.backward(loss)
    with torch.no_grad():
        model.head.bias.grad[1] = math.inf
    assert not opt.step()
    assert opt.last_overflow.names == ["head.bias"]
    assert opt.last_overflow.weights == ()
    assert "head.bias (1 inf of 2)" in str(opt.last_overflow)


def test_a_learner_in_autocast_mode_names_the_layer(tmp_path):
    learn = make_learner(tmp_path).to_fp16(mode="autocast", dtype=torch.bfloat16)

    class Poison(Callback):
        def on_backward_end(self, **kwargs):
            with torch.no_grad():
                learn.model[3].weight.grad.view(-1)[0] = math.nan

    learn.add_cb(Poison())
    learn.fit(1)
    assert learn.opt.last_overflow.names == ["3.weight"]


def test_loading_masters_beyond_the_fp16_range_warns_naming_them():
    model, opt = _setup()
    _backward(model, opt)
    assert opt.step()
    opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    state["masters"][0][0].view(-1)[0] = 7e4  # a checkpoint whose master fp16 cannot hold
    with pytest.warns(
        RuntimeWarning,
        match=r"loaded masters the float16 model cannot hold: encoder\.0\.weight \(its fp32 master reaches \|w\| = 7e\+04",
    ):
        opt.load_state_dict(state)
    assert model.encoder[0].weight.isinf().any()
