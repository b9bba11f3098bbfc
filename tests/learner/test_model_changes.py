"""The Learner when the model changes between fits: a replaced module's parameters leave the
optimizer with their state and masters, the new ones join at the next fit, in every mode;
checkpoints saved after the change load into a learner built on the changed model."""

from functools import partial

import pytest
import torch
from torch import nn

from helpers.learner import assert_identical, snapshot, tiny_data
from mixprec import Learner, MixedPrecisionOptimizer
from mixprec.core.checks import held_params

MODES = {
    "fp32": None,
    "fp16": {"dtype": torch.float16, "loss_scale": "dynamic"},
    "bf16": {"dtype": torch.bfloat16},
    "bf16_flat": {"dtype": torch.bfloat16, "flat_master": True},
    "autocast": {"dtype": torch.bfloat16, "mode": "autocast"},
    "split": {"dtype": torch.bfloat16, "master": "split"},
}


def _model(new_head: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if new_head:
        model[2] = _head()
    return model


def _head() -> nn.Linear:
    torch.manual_seed(7)
    return nn.Linear(16, 4)


def _learner(tmp_path, mode: str, model: nn.Module, **kwargs) -> Learner:
    learn = Learner(tiny_data(), model, path=tmp_path, progress=False, **kwargs)
    if MODES[mode] is not None:
        learn.to_fp16(**MODES[mode])
    return learn


def _fit(learn: Learner, seed: int) -> None:
    torch.manual_seed(seed)  # the same shuffles for every learner compared
    learn.fit(1, lr=1e-2)


def _state_of(learn: Learner, param: torch.Tensor) -> dict:
    """The optimizer state of a model parameter (of its master, per tensor)."""
    opt = learn.opt
    if isinstance(opt, MixedPrecisionOptimizer) and opt.split is None:
        for ps, ms in zip(opt.model_params, opt.master_params):
            for j, p in enumerate(ps):
                if p is param:
                    return opt.optimizer.state.get(ms[0] if opt.flat_master else ms[j], {})
        raise KeyError("not held")
    return learn.opt.state.get(param, {})


@pytest.mark.parametrize("mode", list(MODES))
def test_a_replaced_module_leaves_the_optimizer_and_the_new_one_joins(tmp_path, mode):
    learn = _learner(tmp_path, mode, _model())
    _fit(learn, 1)
    old = learn.model[2]
    head = _head()
    exact = [p.detach().clone() for p in head.parameters()]
    learn.model[2] = head
    _fit(learn, 2)
    held = {id(p) for p in held_params(learn.opt)}
    assert {id(p) for p in learn.model.parameters()} == held
    assert not any(id(p) in held for p in old.parameters())
    inner = getattr(learn.opt, "optimizer", learn.opt)
    state_ids = {id(t) for t in inner.state}
    masters = [m for g in inner.param_groups for m in g["params"]]
    assert {id(m) for m in masters} >= state_ids  # no state left for tensors not stepped
    assert not any(id(p) in state_ids for p in old.parameters())
    if "flat" not in mode:  # per tensor: the body's moments carried on, the head's are new
        assert int(_state_of(learn, learn.model[0].weight)["step"]) == 8
        assert int(_state_of(learn, head.weight)["step"]) == 4
    for p, before in zip(head.parameters(), exact):
        assert not torch.equal(p.detach().float(), before)  # the new head trained
    if isinstance(learn.opt, MixedPrecisionOptimizer):
        assert head.weight.dtype == MODES[mode]["dtype"]
    assert learn.add_new_params() == 0


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16_flat", "autocast", "split"])
def test_a_model_beyond_its_layer_groups_is_refused_changing_nothing(tmp_path, mode):
    model = _model()
    learn = _learner(tmp_path, mode, model, layer_groups=[model[:2], model[2:]])
    _fit(learn, 1)
    before = snapshot(learn)
    groups = [list(g["params"]) for g in learn.opt.param_groups]
    learn.model[2] = _head()  # the layer group model[2:] still holds the old head
    with pytest.raises(ValueError, match=r"set learn.layer_groups again"):
        _fit(learn, 2)
    assert learn.model[2].weight.dtype == torch.float32  # not converted
    assert [list(g["params"]) for g in learn.opt.param_groups] == groups
    learn.model[2] = learn.layer_groups[1][0]  # the old head back: as it was, bit for bit
    assert_identical(snapshot(learn), before)
    learn.model[2] = _head()
    learn.layer_groups = [learn.model[:2], learn.model[2:]]  # the fix the message names
    _fit(learn, 2)
    assert {id(p) for p in held_params(learn.opt)} == {id(p) for p in learn.model.parameters()}


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast", "split"])
def test_a_checkpoint_of_a_grown_model_loads_into_a_learner_built_on_it(tmp_path, mode):
    learn = _learner(tmp_path, mode, _model())
    _fit(learn, 1)
    learn.model[2] = _head()
    _fit(learn, 2)
    learn.save("grown")
    fresh = _learner(tmp_path, mode, _model(new_head=True)).load("grown")
    assert len(fresh.opt.param_groups) != len(learn.opt.param_groups)  # laid out otherwise
    _fit(learn, 3)
    _fit(fresh, 3)  # resumes exactly as the learner that grew
    for a, b in zip(learn.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    fresh.save("fresh")  # and back: the grown learner takes the fresh one's checkpoint
    learn.load("fresh")


def test_flat_masters_of_a_grown_model_load_in_its_layout_or_are_refused(tmp_path):
    learn = _learner(tmp_path, "bf16_flat", _model())
    _fit(learn, 1)
    learn.model[2] = _head()
    _fit(learn, 2)
    learn.save("grown")
    fresh = _learner(tmp_path, "bf16_flat", _model(new_head=True))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"step' differs.*replace the same modules"):
        fresh.load("grown")  # one flat master per group, one step count per master
    assert_identical(snapshot(fresh), before)
    same = _learner(tmp_path, "bf16_flat", _model())
    same.model[2] = _head()  # the fix the message names
    same.load("grown")
    _fit(learn, 3)
    _fit(same, 3)
    for a, b in zip(learn.model.state_dict().values(), same.model.state_dict().values()):
        assert torch.equal(a, b)


def test_to_fp16_after_a_replaced_module_wraps_the_model_as_it_is(tmp_path):
    learn = _learner(tmp_path, "fp32", _model())
    _fit(learn, 1)
    learn.model[2] = _head()
    learn.to_fp16(dtype=torch.bfloat16)
    assert {id(p) for p in held_params(learn.opt)} == {id(p) for p in learn.model.parameters()}
    _fit(learn, 2)


def test_a_refused_to_fp16_after_a_replaced_module_changes_nothing(tmp_path):
    learn = _learner(tmp_path, "fp32", _model(), opt_func=partial(torch.optim.SGD, momentum=0.9))
    _fit(learn, 1)
    old = learn.model[2]
    learn.model[2] = _head()
    groups = [list(g["params"]) for g in learn.opt.param_groups]
    state = {k: dict(v) for k, v in learn.opt.state.items()}
    with pytest.raises(ValueError, match=r"split"):
        learn.to_fp16(dtype=torch.bfloat16, master="split")  # split masters need Adam(W)
    assert [list(g["params"]) for g in learn.opt.param_groups] == groups
    assert old.weight in learn.opt.state and learn.opt.state.keys() == state.keys()
    assert learn.model[2].weight.dtype == torch.float32 and learn.mixed_precision is None


@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16_flat"])
def test_lr_find_after_a_replaced_module_puts_the_updated_learner_back(tmp_path, mode):
    learn = _learner(tmp_path, mode, _model())
    _fit(learn, 1)
    learn.model[2] = _head()
    learn.lr_find(num_it=3)
    before = snapshot(learn)
    learn.lr_find(num_it=3)  # restores exactly what it found
    assert_identical(snapshot(learn), before)
    _fit(learn, 2)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_a_checkpoint_of_an_appended_model_loads_as_saved_2_2_0_1_1_into_3_3_0(tmp_path, mode):
    learn = _learner(tmp_path, mode, _model())
    _fit(learn, 1)
    torch.manual_seed(9)
    learn.model.append(nn.Linear(4, 4))
    _fit(learn, 2)
    learn.save("appended")
    grown = _model()
    torch.manual_seed(9)
    grown.append(nn.Linear(4, 4))
    fresh = _learner(tmp_path, mode, grown).load("appended")
    assert [len(g["params"]) for g in learn.opt.param_groups] == [2, 2, 0, 1, 1]
    assert [len(g["params"]) for g in fresh.opt.param_groups] == [3, 3, 0]
    _fit(learn, 3)
    _fit(fresh, 3)
    for a, b in zip(learn.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
