"""Flat buffers keep each parameter's memory format, and parameters that cannot have an fp32
master (integer, complex, already held, bare tensors as layer groups) are refused clearly."""

import gc

import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.core.master import flat_views, get_master, master2model, model_g2master_g


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(memory_format=torch.channels_last)


def _is_channels_last(p):
    return p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)


def test_flat_master_keeps_channels_last_and_trains_like_per_tensor_masters():
    models = [_conv_net(), _conv_net()]
    conv_weights = [0, 3]
    assert all(not models[0][i].weight.is_contiguous() for i in conv_weights)
    opts = [
        MixedPrecisionOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-2),
            model=m,
            dtype=torch.bfloat16,
            flat_master=flat,
        )
        for m, flat in zip(models, [True, False])
    ]
    x = torch.randn(2, 3, 6, 6).to(torch.bfloat16, memory_format=torch.channels_last)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.backward(model(x).float().square().mean())
            assert opt.step()
            opt.zero_grad()
    flat, per_tensor = models
    for i in conv_weights:
        assert _is_channels_last(flat[i].weight) and _is_channels_last(flat[i].weight.grad)
        assert torch.equal(flat[i].weight, per_tensor[i].weight)
    fg = opts[0]._flat_groups[0]
    assert all(d.is_contiguous() and d.dim() == 1 for d in fg.data)  # still one 1-D buffer
    for p, view in zip(opts[0].model_params[0], flat_views(opts[0].master_params[0][0], fg.params)):
        assert view.stride() == p.stride() and torch.equal(view.to(p.dtype), p.detach())


def test_the_flat_primitives_keep_the_memory_format():
    model = model_to_half(_conv_net(), torch.bfloat16)
    model_params, master_params = get_master([model], flat_master=True)
    views = flat_views(master_params[0][0].detach(), model_params[0])
    assert all(v.stride() == p.stride() for v, p in zip(views, model_params[0]))
    x = torch.randn(2, 3, 6, 6).to(torch.bfloat16, memory_format=torch.channels_last)
    model(x).float().sum().backward()
    model_g2master_g(model_params, master_params, flat_master=True)
    grads = flat_views(master_params[0][0].grad, model_params[0])
    assert all(torch.equal(g, p.grad.float()) for g, p in zip(grads, model_params[0]))
    with torch.no_grad():
        master_params[0][0].mul_(0.5)
    master2model(model_params, master_params, flat_master=True)
    assert all(torch.equal(p.float(), v) for p, v in zip(model_params[0], views))


@pytest.mark.parametrize("flat", [False, True])
def test_integer_and_complex_parameters_are_refused(flat):
    model = model_to_half(nn.Linear(3, 3), torch.bfloat16)
    count = nn.Parameter(torch.tensor([1000, 12345]), requires_grad=False)
    with pytest.raises(TypeError, match=r"integer parameter \(torch.int64.*is_floating_point"):
        MixedPrecisionOptimizer(torch.optim.AdamW([*model.parameters(), count]), flat_master=flat)
    z = nn.Parameter(torch.randn(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"complex parameter.*view_as_real"):
        MixedPrecisionOptimizer(torch.optim.AdamW([*model.parameters(), z]), flat_master=flat)
    assert torch.equal(count, torch.tensor([1000, 12345]))  # untouched


def test_a_parameter_held_by_another_wrapper_is_refused_until_released():
    model = model_to_half(nn.Linear(3, 3), torch.bfloat16)
    first = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="already held by another MixedPrecisionOptimizer"):
        MixedPrecisionOptimizer(torch.optim.AdamW([model.bias]))
    extra = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    second = MixedPrecisionOptimizer(torch.optim.AdamW([extra]))
    with pytest.raises(ValueError, match="already held"):
        second.add_param_group({"params": [model.weight]})
    first.release()
    with pytest.raises(RuntimeError, match="was released"):
        first.step()
    MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))  # free again


def test_a_dropped_wrapper_does_not_hold_its_parameters():
    model = model_to_half(nn.Linear(3, 3), torch.bfloat16)

    def train_once():  # the wrapper is garbage afterwards, if only through a reference cycle
        opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
        opt.backward(model(torch.randn(2, 3, dtype=torch.bfloat16)).float().sum())
        assert opt.step()

    gc.disable()
    try:
        train_once()
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()))
    finally:
        gc.enable()


def test_get_master_refuses_tensors_for_layer_groups():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match=r"layer group 0 is a Tensor .*get_master\(\[model\]\)"):
        get_master(list(model.parameters()))
    with pytest.raises(TypeError, match=r"single Linear. Pass \[model\]"):
        get_master(model)
    with pytest.raises(TypeError, match="single Parameter"):
        get_master(model.weight)
