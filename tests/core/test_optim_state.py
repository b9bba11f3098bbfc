"""Optimizer state dicts and lr schedulers: the keys a scheduler adds to the param groups
(`initial_lr`, `max_lr`, `base_momentum`, ...) are not the optimizer's hyper-parameters, so a
state saved with or without a scheduler loads into a wrapper built with or without one."""

import pytest
import torch
from torch import nn

from mixprec import AutocastOptimizer, MixedPrecisionOptimizer, model_to_half
from mixprec.core.optim_state import check_optimizer_state_dict

SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=8),
}


def _wrapper(mode: str):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    inner_of = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    if mode == "master":
        model_to_half(model, torch.bfloat16)
        return model, MixedPrecisionOptimizer(inner_of(model), 1.0, model=model)
    return model, AutocastOptimizer(inner_of(model), dtype=torch.bfloat16)


def _train_step(model, opt, seed: int = 0) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    dtype = next(model.parameters()).dtype
    with opt.autocast() if isinstance(opt, AutocastOptimizer) else torch.enable_grad():
        loss = model(x.to(dtype)).float().square().mean()
    opt.backward(loss)
    assert opt.step()


def _momenta(opt) -> list[torch.Tensor]:
    inner = opt.optimizer
    return [inner.state[p]["momentum_buffer"] for g in inner.param_groups for p in g["params"]]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("mode", ["master", "autocast"])
def test_a_state_saved_without_a_scheduler_loads_into_a_wrapper_with_one(mode, scheduler):
    model, opt = _wrapper(mode)
    _train_step(model, opt)
    saved = opt.state_dict()
    model2, opt2 = _wrapper(mode)
    sched = SCHEDULERS[scheduler](opt2)
    added = sorted(set(opt2.param_groups[0]) - set(opt.param_groups[0]))
    assert added and set(added).isdisjoint(opt2.optimizer.defaults)
    opt2.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(_momenta(opt2), _momenta(opt)))
    assert set(added) <= set(opt2.param_groups[0])  # the scheduler's keys are kept
    lr_before = opt2.param_groups[0]["lr"]
    _train_step(model2, opt2, seed=1)
    sched.step()  # OneCycleLR reads its keys from the groups
    reference = SCHEDULERS[scheduler](torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    reference.optimizer.step()
    reference.step()
    assert opt2.param_groups[0]["lr"] == reference.get_last_lr()[0] != lr_before


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("mode", ["master", "autocast"])
def test_a_state_saved_with_a_scheduler_loads_into_a_wrapper_without_one(mode, scheduler):
    model, opt = _wrapper(mode)
    sched = SCHEDULERS[scheduler](opt)
    _train_step(model, opt)
    sched.step()
    saved = opt.state_dict()
    model2, opt2 = _wrapper(mode)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert all(torch.equal(a, b) for a, b in zip(_momenta(opt2), _momenta(opt)))
    _train_step(model2, opt2, seed=1)


def test_a_hyper_parameter_the_state_lacks_is_still_refused():
    model = nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    SCHEDULERS["OneCycleLR"](sgd)
    saved = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    check_optimizer_state_dict(sgd, saved)  # scheduler keys missing: fine
    del saved["param_groups"][0]["momentum"]
    with pytest.raises(ValueError, match="param group 0 of the saved optimizer has no momentum,"):
        check_optimizer_state_dict(sgd, saved)
