"""Bad input is refused with a message that says what was expected, what was got and how to
fix it, and refusing it changes nothing: every case below snapshots the state before the
call and checks it bit for bit after the error."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.learner import assert_identical, make_learner, snapshot, tiny_data, tiny_model
from mixprec import DataBunch, Learner, MixedPrecisionOptimizer, model_to_half

# -- the engine -------------------------------------------------------------------------------


def _half_net() -> nn.Module:
    torch.manual_seed(0)
    return model_to_half(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))


def _engine_state(model: nn.Module, inner: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {  # meta tensors hold no values to compare
            k: ("meta", tuple(v.shape)) if v.is_meta else v.clone()
            for k, v in model.state_dict().items()
        },
        "groups": [[id(p) for p in g["params"]] for g in inner.param_groups],
        "state": len(inner.state),
    }


def _fp32_copy_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    fp32 = copy.deepcopy(model).float()  # a model "already in half", optimizer on fp32 copies
    return torch.optim.AdamW(fp32.parameters())


def _other_model_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_half_net().parameters())


def _two_devices(model: nn.Module) -> torch.optim.Optimizer:
    model[2] = nn.Linear(8, 2, device="meta", dtype=torch.float16)
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


ENGINE_CASES = {
    "loss scale 0": (
        _sgd,
        {"loss_scale": 0},
        ValueError,
        "loss_scale must be a positive finite number; got 0",
    ),
    "negative loss scale": (
        _sgd,
        {"loss_scale": -1.0},
        ValueError,
        "positive finite number; got -1.0",
    ),
    "nan loss scale": (
        _sgd,
        {"loss_scale": math.nan},
        ValueError,
        "positive finite number; got nan",
    ),
    "inf loss scale": (
        _sgd,
        {"loss_scale": math.inf},
        ValueError,
        "positive finite number; got inf",
    ),
    "misspelt loss scale": (
        _sgd,
        {"loss_scale": "dynamc"},
        ValueError,
        r'or "dynamic"; got \'dynamc\'',
    ),
    "loss scale 'static'": (
        _sgd,
        {"loss_scale": "static"},
        ValueError,
        r'or "dynamic"; got \'static\'',
    ),
    "loss scale True": (_sgd, {"loss_scale": True}, ValueError, "positive finite number; got True"),
    "loss scale None": (_sgd, {"loss_scale": None}, ValueError, "positive finite number; got None"),
    "init scale 0": (_sgd, {"init_scale": 0.0}, ValueError, "init_scale must be a positive finite"),
    "min above max scale": (
        _sgd,
        {"min_scale": 8.0, "max_scale": 4.0},
        ValueError,
        "min_scale must be <= max_scale",
    ),
    "half model, fp32 optimizer": (
        _fp32_copy_optimizer,
        {},
        ValueError,
        r"holds no fp16/bf16 parameters \(dtypes: \['torch.float32'\]\)",
    ),
    "another model's optimizer": (
        _other_model_optimizer,
        {},
        ValueError,
        r"holds 6 tensor\(s\) that are not parameters of the model",
    ),
    "parameters on the meta device": (
        _two_devices,
        {"flat_master": True},
        ValueError,
        r"holds 2 parameter\(s\) on the meta device \(shapes \[\(2, 8\), \(2,\)\]\), which hold no values",
    ),
    "flat_master the string 'False'": (
        _sgd,
        {"flat_master": "False"},
        TypeError,
        "flat_master must be True or False; got 'False'",
    ),
    "LBFGS": (
        lambda m: torch.optim.LBFGS(m.parameters()),
        {},
        ValueError,
        r"torch.optim.LBFGS cannot be used with mixed precision: LBFGS re-evaluates the loss through a closure",
    ),
    "SparseAdam": (
        lambda m: torch.optim.SparseAdam(list(m.parameters())),
        {},
        ValueError,
        "torch.optim.SparseAdam cannot be used with mixed precision: SparseAdam steps sparse",
    ),
    "static scale 1e-39": (
        _sgd,
        {"loss_scale": 1e-39},
        ValueError,
        r"loss_scale must lie in \[2\*\*-126, 2\*\*126\] .* got 1e-39",
    ),
    "static scale 1e39": (_sgd, {"loss_scale": 1e39}, ValueError, r"must lie in .* got 1e\+39"),
    "fused SGD": (
        _sgd,
        {"fused": True},
        ValueError,
        "fused=True cannot be used: the fused step implements",
    ),
    "clip 0": (
        _sgd,
        {"clip": 0},
        ValueError,
        "clip must be None or a positive finite max norm; got 0",
    ),
}


@pytest.mark.parametrize(
    ("make", "options", "error", "message"), ENGINE_CASES.values(), ids=ENGINE_CASES.keys()
)
def test_the_engine_refuses_bad_settings_and_leaves_the_optimizer_alone(
    make, options, error, message
):
    model = _half_net()
    inner = make(model)
    before = _engine_state(model, inner)
    with pytest.raises(error, match=message):
        MixedPrecisionOptimizer(inner, model=model, **options)
    assert_identical(_engine_state(model, inner), before)


def test_a_model_that_is_not_a_module_is_refused():
    model = _half_net()
    inner = _sgd(model)
    before = _engine_state(model, inner)
    with pytest.raises(
        TypeError,
        match=r"model must be the nn\.Module whose parameters the optimizer holds; got str",
    ):
        MixedPrecisionOptimizer(inner, model="net")
    assert_identical(_engine_state(model, inner), before)


def _trained_engine() -> tuple[nn.Module, MixedPrecisionOptimizer]:
    model = _half_net()
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "dynamic", model=model)
    _backward(model, opt)
    opt.step()
    opt.zero_grad()
    return model, opt


def _backward(model: nn.Module, opt: MixedPrecisionOptimizer) -> None:
    opt.backward(model(torch.ones(2, 4).half()).float().square().mean())


def _full_state(model: nn.Module, opt: MixedPrecisionOptimizer) -> dict[str, Any]:
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}


def _step_twice(model, opt):
    _backward(model, opt)
    opt.step()
    return opt.step


def _unscale_twice(model, opt):
    _backward(model, opt)
    opt.unscale_()
    return opt.unscale_


def _backward_after_unscale(model, opt):
    _backward(model, opt)
    opt.unscale_()
    return lambda: _backward(model, opt)


CALL_ORDER = {
    "step without backward": (
        lambda m, o: o.step,
        RuntimeError,
        r"no gradients to step on: call backward\(loss\)",
    ),
    "step twice without backward": (_step_twice, RuntimeError, "no gradients to step on"),
    "unscale_ twice": (
        _unscale_twice,
        RuntimeError,
        r"unscale_\(\) has already been called since the last step",
    ),
    "backward after unscale_": (
        _backward_after_unscale,
        RuntimeError,
        r"call step\(\) before the next backward",
    ),
    "step with a closure": (
        lambda m, o: lambda: o.step(lambda: 0.0),
        TypeError,
        "takes no closure",
    ),
}


@pytest.mark.parametrize(("setup", "error", "message"), CALL_ORDER.values(), ids=CALL_ORDER.keys())
def test_calls_out_of_order_are_refused_and_change_nothing(setup, error, message):
    model, opt = _trained_engine()
    call = setup(model, opt)
    before = _full_state(model, opt)
    with pytest.raises(error, match=message):
        call()
    assert_identical(_full_state(model, opt), before)


# -- the Learner ------------------------------------------------------------------------------


def _learner_state(learn: Learner) -> dict[str, Any]:
    return {
        **snapshot(learn),
        "opt": id(learn.opt),
        "callbacks": [type(cb).__name__ for cb in learn.callbacks],
        "tfms": list(learn.data.tfms),
        "counts": (learn.epoch, learn.iteration),
        "recorder": learn.recorder.state_dict(),
        "rng": torch.get_rng_state(),
    }


def _data_from(batches: list) -> DataBunch:
    return DataBunch(batches, device="cpu")


def _frozen(learn):
    for p in learn.model.parameters():
        p.requires_grad_(False)
    return lambda: learn.fit(1)


def _halved_by_hand(learn):
    learn.create_opt()  # on the fp32 parameters
    model_to_half(learn.model)
    return lambda: learn.fit(1)


def _foreign_opt_fp16(learn):
    learn.opt = torch.optim.AdamW(tiny_model().parameters())
    return lambda: learn.to_fp16()


def _foreign_opt_fit(learn):
    learn.opt = torch.optim.AdamW(tiny_model().parameters())
    return lambda: learn.fit(1)


def _bad_batches(batches):
    def setup(learn):
        learn.to_fp16()
        learn.data = _data_from(batches)
        return lambda: learn.fit(1)

    return setup


x8, y8 = torch.randn(8, 8), torch.randint(0, 4, (8,))
LEARNER_CASES: dict[str, tuple[Callable, type, str]] = {
    "to_fp16 loss scale 0": (
        lambda learn: lambda: learn.to_fp16(loss_scale=0),
        ValueError,
        "loss_scale must be a positive finite number; got 0",
    ),
    "to_fp16 loss scale 'Dynamic'": (
        lambda learn: lambda: learn.to_fp16(loss_scale="Dynamic"),
        ValueError,
        'or "dynamic"',
    ),
    "to_fp16 nan loss scale": (
        lambda learn: lambda: learn.to_fp16(loss_scale=math.nan),
        ValueError,
        "got nan",
    ),
    "to_fp16 fp32 dtype": (
        lambda learn: lambda: learn.to_fp16(dtype=torch.float32),
        ValueError,
        "dtype must be one of torch.float16, torch.bfloat16; got torch.float32",
    ),
    "to_fp16 float64 dtype": (
        lambda learn: lambda: learn.to_fp16(dtype=torch.float64),
        ValueError,
        "dtype must be one of",
    ),
    "to_fp16 int8 dtype": (
        lambda learn: lambda: learn.to_fp16(dtype=torch.int8),
        ValueError,
        "got torch.int8",
    ),
    "to_fp16 dtype as a string": (
        lambda learn: lambda: learn.to_fp16(dtype="fp16"),
        TypeError,
        "dtype must be a torch.dtype",
    ),
    "no trainable parameters": (
        _frozen,
        ValueError,
        r"has no trainable parameters: all 6 have requires_grad=False",
    ),
    "half model in an fp32 learner": (
        _halved_by_hand,
        ValueError,
        r"holds 4 trainable torch.float16 parameter\(s\) \(0.weight, 0.bias, 3.weight, 3.bias\) but this learner trains in fp32",
    ),
    "optimizer of another model, to_fp16": (
        _foreign_opt_fp16,
        ValueError,
        r"the optimizer holds 6 tensor\(s\) that are not parameters of the model",
    ),
    "optimizer of another model, fit": (
        _foreign_opt_fit,
        ValueError,
        r"the optimizer holds 6 tensor\(s\) that are not parameters",
    ),
    "input a list of floats": (
        _bad_batches([([1.0] * 8, y8)]),
        TypeError,
        "batch 0: the input holds no tensor; got list of length 8",
    ),
    "input a numpy array": (
        _bad_batches([(np.zeros((8, 8)), y8)]),
        TypeError,
        "batch 0: the input holds no tensor; got numpy.ndarray",
    ),
    "target a list of ints": (
        _bad_batches([(x8, [1] * 8)]),
        TypeError,
        "batch 0: the target holds no tensor; got list of length 8",
    ),
    "batch a bare tensor": (
        _bad_batches([x8]),
        TypeError,
        r"batch 0 must be an \(input, target\) pair; got a tensor of shape \(8, 8\)",
    ),
    "batch a triple": (
        _bad_batches([(x8, y8, y8)]),
        TypeError,
        r"must be an \(input, target\) pair; got tuple of length 3",
    ),
    "lr nan": (
        lambda learn: lambda: learn.fit(1, lr=math.nan),
        ValueError,
        "lr must be a finite number >= 0; got nan",
    ),
}


@pytest.mark.parametrize(
    ("setup", "error", "message"), LEARNER_CASES.values(), ids=LEARNER_CASES.keys()
)
def test_the_learner_refuses_bad_input_and_changes_nothing(tmp_path, setup, error, message):
    learn = make_learner(tmp_path)
    call = setup(learn)
    before = _learner_state(learn)
    with pytest.raises(error, match=message):
        call()
    assert_identical(_learner_state(learn), before)


def test_a_model_without_parameters_is_refused_before_anything_is_built(tmp_path):
    learn = Learner(tiny_data(), nn.Sequential(nn.ReLU()), path=tmp_path, progress=False)
    with pytest.raises(
        ValueError, match=r"the model \(Sequential\) has no floating-point parameters"
    ):
        learn.to_fp16()
    assert learn.opt is None and learn.callbacks == []


def test_a_trainable_parameter_outside_the_layer_groups_is_refused(tmp_path):
    learn = make_learner(tmp_path)
    learn.layer_groups = [learn.model[:3]]  # the last Linear would get grads and never move
    before = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(
        ValueError,
        match=r"does not hold 2 trainable parameter\(s\) of the model \(3.weight, 3.bias\)",
    ):
        learn.fit(1)
    assert_identical(learn.model.state_dict(), before)
    assert learn.iteration == 0


# -- checkpoints ------------------------------------------------------------------------------


def _saved(tmp_path, name, build: Callable[[Learner], Any] = lambda learn: learn) -> Learner:
    learn = build(make_learner(tmp_path))
    learn.fit(1)
    learn.save(name)
    return learn


def _other_model(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    learn = Learner(tiny_data(), model, path=tmp_path, progress=False).to_fp16()
    learn.fit(1)
    learn.save("other")
    return "other"


def _rewrite(tmp_path, change: Callable[[bytes], bytes]) -> str:
    path = _saved(tmp_path, "good", lambda learn: learn.to_fp16()).save("good")
    path.with_name("bad.pth").write_bytes(change(path.read_bytes()))
    return "bad"


def _flip_tensor_bytes(data: bytes) -> bytes:
    at = data.index(b"archive/data/0") + 200  # inside the first tensor's bytes
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _bad_scale(tmp_path):
    learn = _saved(tmp_path, "scaled", lambda learn: learn.to_fp16())
    ckpt = torch.load(learn.save("scaled"), weights_only=True)
    ckpt["opt"]["scaler"]["scale"] = 0.0
    torch.save(ckpt, tmp_path / "models" / "zero_scale.pth")
    return "zero_scale"


CHECKPOINT_CASES = {
    "another model": (
        _other_model,
        {},
        r"holds the weights of another model: 2 tensor\(s\) of another shape \(3.weight saved \(5, 16\), here \(4, 16\)",
    ),
    "bf16 checkpoint into fp16": (
        lambda p: _saved(p, "bf16", lambda learn: learn.to_fp16(dtype=torch.bfloat16)) and "bf16",
        {},
        r"saved training in torch.bfloat16 but this learner trains in torch.float16",
    ),
    "fp32 checkpoint into mixed": (
        lambda p: _saved(p, "fp32") and "fp32",
        {},
        r"was saved in fp32; call learn.to_fp32\(\)",
    ),
    "flat into per-tensor": (
        lambda p: _saved(p, "flat", lambda learn: learn.to_fp16(flat_master=True)) and "flat",
        {},
        "saved with flat_master=True but this optimizer has flat_master=False",
    ),
    "static into dynamic": (
        lambda p: _saved(p, "static", lambda learn: learn.to_fp16()) and "static",
        {"loss_scale": "dynamic"},
        "from a static scaler but this one is dynamic",
    ),
    "other layer groups": (
        lambda p: (
            _saved(
                p,
                "groups",
                lambda learn: Learner(
                    learn.data,
                    learn.model,
                    layer_groups=[learn.model[:3], learn.model[3:]],
                    path=p,
                    progress=False,
                ).to_fp16(),
            )
            and "groups"
        ),
        {},
        r"the saved optimizer has parameters per group \[1, 1, 2, 1, 1, 0\], but this one has "
        r"\[2, 2, 2\]: it was saved with other layer groups",
    ),
    "truncated file": (
        lambda p: _rewrite(p, lambda b: b[: len(b) // 2]),
        {},
        "is truncated or corrupted: it is not a complete torch checkpoint archive",
    ),
    "empty file": (lambda p: _rewrite(p, lambda b: b""), {}, "is truncated or corrupted"),
    "garbage bytes": (
        lambda p: _rewrite(p, lambda b: bytes(range(256)) * 64),
        {},
        "is truncated or corrupted",
    ),
    "one flipped bit in a tensor": (
        lambda p: _rewrite(p, _flip_tensor_bytes),
        {},
        r"is corrupted: the bytes of its part '[\w/]+' do not match the checksum",
    ),
    "zero loss scale inside": (_bad_scale, {}, "scale must be a positive finite number; got 0.0"),
}


@pytest.mark.parametrize(
    ("prepare", "options", "message"), CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys()
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_loads(
    tmp_path, prepare, options, message
):
    name = prepare(tmp_path)
    learn = make_learner(tmp_path, seed=11).to_fp16(**options)
    learn.fit(1)
    before = _learner_state(learn)
    with pytest.raises(ValueError, match=message):
        learn.load(name)
    assert_identical(_learner_state(learn), before)


def test_a_loader_with_other_random_generators_is_refused_before_anything_loads(tmp_path):
    _saved(tmp_path, "plain")
    learn = make_learner(tmp_path, seed=5)
    loader = DataLoader(
        TensorDataset(x8, y8), batch_size=4, shuffle=True, generator=torch.Generator()
    )
    learn.data = DataBunch(loader, device="cpu")
    learn.fit(1)
    before = _learner_state(learn)
    with pytest.raises(
        ValueError,
        match="holds 0 data-loader generator states but this learner's training loader has 1",
    ):
        learn.load("plain")
    assert_identical(_learner_state(learn), before)


# -- weights that fp16 cannot hold: a warning before training, not a nan after it ------------


def test_weights_beyond_the_fp16_range_are_warned_about_before_training(tmp_path):
    learn = make_learner(tmp_path)
    with torch.no_grad():
        learn.model[3].weight[0, 0] = 1e5
    with pytest.warns(
        RuntimeWarning,
        match=r"3.weight: 1 value\(s\) beyond the float16 range \(max \|w\| = 1e\+05 > 65504\) would become inf; keep '3' in fp32",
    ):
        learn.to_fp16()
    assert learn.opt.scaler.steps == 0  # nothing trained yet
    with torch.no_grad():
        bad = tiny_model()
        bad[0].bias[1] = math.nan
    with pytest.warns(RuntimeWarning, match=r"0.bias already holds 1 inf/nan value\(s\)"):
        model_to_half(bad)


def test_bf16_and_in_range_models_convert_without_a_warning():
    model = tiny_model()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_to_half(model, torch.bfloat16)  # bf16 has the range of fp32
        model_to_half(tiny_model())


def test_fp32_learners_refuse_checkpoints_that_do_not_fit_before_anything_loads(tmp_path):
    other = make_learner(tmp_path, layer_groups=True)  # two layer groups: six param groups
    other.fit(1)
    other.save("two_groups")
    _saved(tmp_path, "mixed", lambda learn: learn.to_fp16())
    learn = make_learner(tmp_path, seed=11)
    learn.fit(1)
    before = _learner_state(learn)
    with pytest.raises(
        ValueError,
        match=r"the saved optimizer has parameters per group \[1, 1, 2, 1, 1, 0\], but this "
        r"one has \[2, 2, 2\]: it was saved with other layer groups",
    ):
        learn.load("two_groups")
    with pytest.raises(ValueError, match=r"was saved in mixed precision; call learn\.to_fp16"):
        learn.load("mixed")
    assert_identical(_learner_state(learn), before)


# -- loads of another optimizer's state: refused whole, naming what differs ---------------

SGD_MOMENTUM = functools.partial(torch.optim.SGD, momentum=0.9)


@pytest.mark.parametrize("mode", ["fp32", "master", "flat", "autocast"])
@pytest.mark.parametrize(
    ("saved_with", "loaded_into", "message"),
    [
        (
            SGD_MOMENTUM,
            torch.optim.AdamW,
            r"saved by a torch\.optim\.sgd\.SGD but is being loaded into a torch\.optim\.adamw\.AdamW",
        ),
        (
            torch.optim.AdamW,
            SGD_MOMENTUM,
            r"saved by a torch\.optim\.adamw\.AdamW but is being loaded into a torch\.optim\.sgd\.SGD",
        ),
    ],
    ids=["SGD into AdamW", "AdamW into SGD"],
)
def test_learn_load_of_another_optimizer_type_is_refused_and_changes_nothing(
    tmp_path, mode, saved_with, loaded_into, message
):
    options = {
        "fp32": None,
        "master": {},
        "flat": {"flat_master": True},
        "autocast": {"mode": "autocast", "dtype": torch.bfloat16},
    }[mode]

    def build(opt_func, seed):
        learn = make_learner(tmp_path, seed=seed, opt_func=opt_func)
        return learn if options is None else learn.to_fp16(**options)

    saver = build(saved_with, 0)
    saver.fit(1)
    saver.save("other_type")
    learn = build(loaded_into, 1)
    learn.fit(1)
    before = _learner_state(learn)
    with pytest.raises(ValueError, match=message):
        learn.load("other_type")
    assert_identical(_learner_state(learn), before)
    learn.fit(1)  # and it still trains


def _engine_states(make_inner):
    model = _half_net()
    opt = MixedPrecisionOptimizer(make_inner(model.parameters()), 512.0, model=model)
    _backward(model, opt)
    assert opt.step()
    opt.zero_grad()
    return model, opt


ENGINE_LOADS = {
    "SGD state into AdamW, no type recorded": (
        lambda sd: {**sd, "optimizer_type": None},
        SGD_MOMENTUM,
        ValueError,
        r"param group 0 of the saved optimizer has no betas, eps, which this AdamW needs",
    ),
    "SGD state into AdamW": (
        lambda sd: sd,
        SGD_MOMENTUM,
        ValueError,
        r"saved by a torch\.optim\.sgd\.SGD but is being loaded into a torch\.optim\.adamw",
    ),
    "per-parameter state of SGD with AdamW's groups": (
        lambda sd: {
            **sd,
            "optimizer_type": None,
            "optimizer": {**sd["optimizer"], "param_groups": _adamw_groups()},
        },
        SGD_MOMENTUM,
        ValueError,
        r"state of parameter 0 holds \['momentum_buffer'\] \(as SGD keeps\), but a AdamW needs",
    ),
    "None": (
        lambda sd: None,
        torch.optim.AdamW,
        TypeError,
        "expected a MixedPrecisionOptimizer state_dict .*got NoneType",
    ),
    "moments of another shape": (
        lambda sd: _reshaped_moment(sd),
        torch.optim.AdamW,
        ValueError,
        r"the saved state 'exp_avg' of parameter 0 has shape \(3,\), but the parameter has \(8, 4\)",
    ),
    "scaler state holding strings": (
        lambda sd: {**sd, "scaler": {**sd["scaler"], "steps": "12"}},
        torch.optim.AdamW,
        ValueError,
        "state_dict: steps must be an integer >= 0; got '12'",
    ),
    "scaler scale a string": (
        lambda sd: {**sd, "scaler": {**sd["scaler"], "scale": "big"}},
        torch.optim.AdamW,
        ValueError,
        "state_dict: scale must be a positive finite number; got 'big'",
    ),
    "masters in fp16": (
        lambda sd: {**sd, "masters": [[m.half() for m in g] for g in sd["masters"]]},
        torch.optim.AdamW,
        ValueError,
        "holds masters of dtype torch.float16; expected fp32",
    ),
}


def _adamw_groups():
    return torch.optim.AdamW(_half_net().parameters()).state_dict()["param_groups"]


def _reshaped_moment(sd):
    state = {k: dict(v) for k, v in sd["optimizer"]["state"].items()}
    state[0]["exp_avg"] = torch.zeros(3)
    return {**sd, "optimizer": {**sd["optimizer"], "state": state}}


@pytest.mark.parametrize(
    ("change", "saved_with", "error", "message"), ENGINE_LOADS.values(), ids=ENGINE_LOADS.keys()
)
def test_engine_load_state_dict_refuses_what_does_not_fit_and_changes_nothing(
    change, saved_with, error, message
):
    _, other = _engine_states(saved_with)
    saved = change(copy.deepcopy(other.state_dict()))
    model, opt = _engine_states(torch.optim.AdamW)
    before = _full_state(model, opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(saved)
    assert_identical(_full_state(model, opt), before)
    _backward(model, opt)
    assert opt.step()  # and it still steps


def test_autocast_load_state_dict_refuses_another_optimizer_type():
    from mixprec import AutocastOptimizer

    model = nn.Linear(4, 2)
    sgd = AutocastOptimizer(SGD_MOMENTUM(model.parameters(), lr=0.1), dtype=torch.bfloat16)
    adamw = AutocastOptimizer(torch.optim.AdamW(model.parameters()), dtype=torch.bfloat16)
    for opt in (sgd, adamw):
        with opt.autocast():
            loss = model(torch.ones(2, 4)).float().square().mean()
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    before = copy.deepcopy(adamw.state_dict())
    with pytest.raises(ValueError, match=r"saved by a torch\.optim\.sgd\.SGD"):
        adamw.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"has no betas, eps"):
        adamw.load_state_dict({**sgd.state_dict(), "optimizer_type": None})
    with pytest.raises(TypeError, match="got NoneType"):
        adamw.load_state_dict(None)
    assert_identical(adamw.state_dict(), before)


# -- arguments refused at the door ------------------------------------------------------------

CONSTRUCTOR_CASES = {
    "loss_func None": ({"loss_func": None}, TypeError, "loss_func must be a callable loss_func"),
    "opt_func None": ({"opt_func": None}, TypeError, "opt_func must be a callable opt_func"),
    "model_dir None": ({"model_dir": None}, TypeError, "model_dir must be a str or os.PathLike"),
    "path None": ({"path": None}, TypeError, "path must be a str or os.PathLike"),
    "wd a string": (
        {"wd": "abc"},
        ValueError,
        "wd must be None or a finite number >= 0; got 'abc'",
    ),
}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), CONSTRUCTOR_CASES.values(), ids=CONSTRUCTOR_CASES.keys()
)
def test_the_learner_refuses_bad_arguments_when_built(kwargs, error, message):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        Learner(tiny_data(), model, progress=False, **{"path": ".", **kwargs})
    assert_identical(model.state_dict(), before)


def test_data_and_transforms_of_the_wrong_kind_are_refused():
    with pytest.raises(TypeError, match=r"train_dl must be an iterable of .* got NoneType"):
        DataBunch(None)
    with pytest.raises(
        TypeError, match=r"tfms must be a list of batch transforms; got abs. Pass tfms=\[fn\]"
    ):
        DataBunch([], tfms=abs)


def test_validate_on_a_list_of_numbers_says_what_a_batch_is(tmp_path):
    learn = make_learner(tmp_path)
    before = _learner_state(learn)
    with pytest.raises(TypeError, match=r"batch 0 must be an \(input, target\) pair; got int"):
        learn.validate([1, 2])
    assert_identical(_learner_state(learn), before)


def test_add_param_group_without_params_is_refused():
    model, opt = _trained_engine()
    before = _full_state(model, opt)
    with pytest.raises(
        ValueError, match=r"a param group must have a 'params' entry .* got keys \[\]"
    ):
        opt.add_param_group({})
    with pytest.raises(TypeError, match="a param group must be a dict"):
        opt.add_param_group([torch.zeros(2)])
    assert_identical(_full_state(model, opt), before)


def test_mismatched_lists_to_the_primitives_are_refused_before_copying():
    from mixprec import get_master, master2model, model_g2master_g

    model = _half_net()
    model_params, master_params = get_master([model[:1], model[1:]])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model_params has 2 group\(s\) but master_params has 1"):
        master2model(model_params, master_params[:1])
    with pytest.raises(ValueError, match=r"group 0: 2 model parameter\(s\) but 1 master\(s\)"):
        model_g2master_g(model_params, [master_params[0][:1], master_params[1]])
    assert_identical(model.state_dict(), before)


def test_sparse_gradient_embeddings_are_refused():
    model = model_to_half(nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _engine_state(model, inner)
    with pytest.raises(
        ValueError, match=r"0: embedding\(s\) with sparse=True give sparse gradients"
    ):
        MixedPrecisionOptimizer(inner, model=model)
    assert_identical(_engine_state(model, inner), before)


def test_numpy_numbers_and_0d_tensors_are_accepted_as_scale_and_lr(tmp_path):
    for scale in (np.float32(256.0), np.int64(256), torch.tensor(256.0)):
        assert MixedPrecisionOptimizer(_sgd(_half_net()), scale).loss_scale == 256.0
    learn = make_learner(tmp_path).to_fp16(loss_scale=np.float64(64.0))
    learn.fit(1, lr=np.float32(1e-3))
    learn.fit(1, lr=torch.tensor(1e-3))
    assert learn.opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert type(learn.opt.param_groups[0]["lr"]) is float


# -- to_fp16 failing late gives back the exact fp32 model -------------------------------------


def _raising_opt_func(param_groups, lr):
    raise RuntimeError("no optimizer today")


TO_FP16_LATE = {
    "opt_func raises": (_raising_opt_func, RuntimeError, "no optimizer today"),
    "opt_func returns None": (
        lambda groups, lr: None,
        TypeError,
        r"opt_func\(param_groups, lr=lr\) must return a torch.optim.Optimizer; got NoneType",
    ),
    "LBFGS": (
        torch.optim.LBFGS,
        ValueError,
        "torch.optim.LBFGS cannot be used with mixed precision",
    ),
}


@pytest.mark.parametrize(
    ("opt_func", "error", "message"), TO_FP16_LATE.values(), ids=TO_FP16_LATE.keys()
)
def test_to_fp16_failing_late_restores_the_exact_fp32_model(tmp_path, opt_func, error, message):
    learn = make_learner(tmp_path, opt_func=opt_func)
    before = _learner_state(learn)
    with pytest.raises(error, match=message):
        learn.to_fp16()
    assert_identical(_learner_state(learn), before)  # values and dtypes, bit for bit
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    learn.opt_func = torch.optim.AdamW
    learn.to_fp16().fit(1)  # and it still converts and trains


# -- file names: plain names only -------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "sub/dir", "..", "a\\b"])
def test_save_and_load_refuse_names_that_are_not_plain_file_names(tmp_path, name):
    learn = make_learner(tmp_path / "run")
    for call in (learn.save, learn.load):
        with pytest.raises(
            ValueError,
            match=r"name must be a plain file name, without folders.*save_checkpoint\(path\)",
        ):
            call(name)
    assert not any(tmp_path.rglob("*.pth"))
