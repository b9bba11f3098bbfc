"""The fused Adam(W) step: the unfused path's numbers, 16 bytes per parameter, same API."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from helpers.dispatch import OpRecorder
from mixprec import MixedPrecisionOptimizer, model_to_half

CASES = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "adam_l2": (torch.optim.Adam, {"weight_decay": 0.05}),
    "adam_amsgrad_maximize": (torch.optim.Adam, {"amsgrad": True, "maximize": True}),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)  # never called: its grads stay None (zeros when flat)

    def forward(self, x):
        return self.head(self.body(x))


def _setup(opt_cls, opt_kwargs, *, fused, flat, clip=None, chunk=None, seed=0):
    torch.manual_seed(seed)
    model = model_to_half(Net())
    groups = [
        {"params": model.body.parameters(), "lr": 1e-2},
        {"params": [*model.head.parameters(), *model.unused.parameters()], "lr": 5e-3},
    ]
    opt = MixedPrecisionOptimizer(
        opt_cls(groups, **opt_kwargs), 512.0, flat_master=flat, clip=clip, fused=fused
    )
    if chunk is not None and fused:  # small chunks: split tensors, batch several per kernel
        opt.update.kernel.chunk = chunk
    return model, opt


def _train(model, opt, steps, *, start=0, inf_steps=(), accumulate=1, unscale=False):
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    taken = []
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        for _ in range(accumulate):
            x, y = torch.randn(6, 8, generator=g).half(), torch.randn(6, 4, generator=g)
            loss = (model(x).float() - y).square().mean()
            opt.backward(loss * float("inf") if i in inf_steps else loss)
        if unscale:
            opt.unscale_()
        taken.append(opt.step())
        if taken[-1]:
            sched.step()
        opt.zero_grad()
    return taken


def _masters(opt):
    return [m.detach().clone() for group in opt.master_params for m in group]


def _state(opt):
    return [
        {k: v.clone() for k, v in opt.state[m].items()}
        for group in opt.master_params
        for m in group
    ]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_fused_matches_unfused_with_skips(case, flat, clip):
    opt_cls, kw = CASES[case]
    runs = []
    for fused in (False, True):
        model, opt = _setup(opt_cls, kw, fused=fused, flat=flat, clip=clip, chunk=24)
        with OpRecorder() as rec:
            taken = _train(model, opt, 6, inf_steps={0, 3})
        fused_calls = rec.count("_fused_adamw_") + rec.count("_fused_adam_")
        assert fused_calls >= (4 if fused else 0) and (fused or fused_calls == 0)
        runs.append((taken, _masters(opt), _state(opt), opt.skipped_steps, opt.last_grad_norm))
    (taken_a, masters_a, state_a, skip_a, norm_a), (taken_b, masters_b, state_b, skip_b, norm_b) = (
        runs
    )
    assert taken_a == taken_b == [False, True, True, False, True, True]
    assert skip_a == skip_b == 2
    for a, b in zip(masters_a, masters_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert [sorted(s) for s in state_a] == [sorted(s) for s in state_b]
    for sa, sb in zip(state_a, state_b):
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k].to(sb[k].dtype), rtol=1e-5, atol=1e-7)
    if clip is not None:
        torch.testing.assert_close(norm_b, norm_a, rtol=1e-5, atol=0)
    if not flat:  # the unused layer got no gradient, so no state and no change
        assert len(opt.state[opt.master_params[1][-1]]) == 0


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])
def test_fused_is_bitwise_the_unfused_path_over_torch_fused_adamw(flat):
    results = []
    for fused, inner in ((False, {"fused": True}), (True, {})):
        model, opt = _setup(
            torch.optim.AdamW, {"weight_decay": 0.1, **inner}, fused=fused, flat=flat
        )
        _train(model, opt, 4, inf_steps={1})
        results.append((_masters(opt), [p.detach().clone() for p in model.parameters()]))
    (masters_a, model_a), (masters_b, model_b) = results
    assert all(torch.equal(a, b) for a, b in zip(masters_a, masters_b))
    assert all(torch.equal(a, b) for a, b in zip(model_a, model_b))


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])
def test_fused_keeps_no_fp32_gradient_and_rounds_masters_into_the_model(flat):
    model, opt = _setup(torch.optim.AdamW, {}, fused=True, flat=flat)
    assert opt.fused
    assert all(m.grad is None for group in opt.master_params for m in group)
    _train(model, opt, 2)
    assert all(m.grad is None for group in opt.master_params for m in group)
    for group, masters in zip(opt.model_params, opt.master_params):
        values = torch.cat([m.detach().reshape(-1) for m in masters])  # flat: just the one
        offset = 0
        for p in group:  # half params, and the fp32 LayerNorm ones
            n = p.numel()
            assert torch.equal(p.detach().reshape(-1), values[offset : offset + n].to(p.dtype))
            offset += n


def test_fused_state_dict_round_trips_exactly_and_loads_into_the_unfused_path():
    model, opt = _setup(torch.optim.AdamW, {"weight_decay": 0.1}, fused=True, flat=True)
    _train(model, opt, 3, inf_steps={1})
    saved = copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, start=3)
    expected = _masters(opt)
    for fused in (True, False):
        model2, opt2 = _setup(
            torch.optim.AdamW, {"weight_decay": 0.1}, fused=fused, flat=True, seed=1
        )
        opt2.load_state_dict(copy.deepcopy(saved))
        assert opt2.skipped_steps == 1
        _train(model2, opt2, 3, start=3)
        for a, b in zip(expected, _masters(opt2)):
            if fused:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_unfused_state_dict_loads_into_the_fused_path():
    model, opt = _setup(torch.optim.Adam, {}, fused=False, flat=False)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    _train(model, opt, 2, start=2)
    model2, opt2 = _setup(torch.optim.Adam, {}, fused=True, flat=False, seed=1)
    opt2.load_state_dict(saved)
    _train(model2, opt2, 2, start=2)
    for a, b in zip(_masters(opt), _masters(opt2)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["accumulate", "unscale"])
def test_accumulation_and_explicit_unscale_fall_back_and_free_the_fp32_grads(how):
    kwargs = {"accumulate": 2} if how == "accumulate" else {"unscale": True}
    results = []
    for fused in (False, True):
        model, opt = _setup(torch.optim.AdamW, {}, fused=fused, flat=True, clip=0.1)
        _train(model, opt, 3, inf_steps={1}, **kwargs)
        results.append(_masters(opt))
    for a, b in zip(*results):
        # the fused kernel on the fp32 grads against AdamW's own step: fp32 rounding apart
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(m.grad is None for group in opt.master_params for m in group)


def test_fused_requires_adam_or_adamw():
    model = model_to_half(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"implements torch.optim.Adam and AdamW; got SGD"):
        MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), fused=True)
    with pytest.raises(ValueError, match=r"differentiable=True is not supported"):
        MixedPrecisionOptimizer(
            torch.optim.Adam(model.parameters(), differentiable=True), fused=True
        )
    opt = MixedPrecisionOptimizer(torch.optim.Adam(model.parameters()), fused=True)
    assert "fused=True" in repr(opt)


def test_fused_handles_channels_last_weights_like_the_unfused_path():
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = model_to_half(nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
        opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), 512.0, fused=fused)
        assert not opt.master_params[0][0].is_contiguous()  # the odd-layout path
        for i in range(3):
            x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)).half()
            opt.backward(model(x).float().square().mean())
            assert opt.step()
            opt.zero_grad()
        results.append(_masters(opt))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_plan_is_kept_across_steps_and_keeps_no_old_gradient_alive():
    torch.manual_seed(0)
    model = model_to_half(nn.Linear(8, 4))
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), 512.0)
    plans, grads = [], []
    for _ in range(3):
        opt.backward(model(torch.randn(2, 8).half()).float().sum())
        grads.append(weakref.ref(model.weight.grad))
        assert opt.step()
        opt.zero_grad()  # set_to_none: the next backward makes new gradients
        plans.append(opt.update.kernel._cache[1])
    assert plans[0] is plans[1] is plans[2]  # re-pointed, not planned again
    assert all(c.grads == [] for c in plans[0].chunks)
    assert all(p.grad is None for p in plans[0].natives)
    gc.collect()
    assert all(g() is None for g in grads)  # the plan held none of them


@pytest.mark.parametrize("master", ["fp32", "split"])
@pytest.mark.parametrize("native", [True, False])
def test_a_parameter_given_new_memory_is_stepped_there(master, native):
    """`p.data = ...` keeps the Parameter (and its id) but not its memory: the step writes
    where the model reads, with the numbers of a run where nothing moved."""
    runs = []
    for move in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            model=model,
            dtype=torch.bfloat16,
            master=master,
        )
        opt.update.kernel.use_native = native
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
        for i in range(3):
            if move and i == 1:
                for p in model.parameters():
                    p.data = p.data.clone()
            opt.backward(model(x).float().pow(2).mean())
            assert opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_state_tensor_replaced_in_place_of_the_dict_is_stepped():
    """A moment swapped for a new tensor behind the optimizer's back (the old one dropped
    first) is the one the next step updates: the cached plan is made again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )
    x = torch.randn(4, 64).to(torch.bfloat16)
    for _ in range(2):
        opt.backward(model(x).float().square().mean())
        opt.step()
        opt.zero_grad()
    for state in opt.optimizer.state.values():
        shape = state["exp_avg"].shape
        del state["exp_avg"]
        state["exp_avg"] = torch.full(shape, 0.25)
    opt.backward(model(x).float().square().mean())
    opt.step()
    for state in opt.optimizer.state.values():
        assert not torch.equal(state["exp_avg"], torch.full_like(state["exp_avg"], 0.25))
