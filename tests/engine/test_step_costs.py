"""What a step costs: flat buffers that stay put, no allocation, few kernels, one host sync."""

import itertools

import pytest
import torch
from torch import nn

from helpers.dispatch import OpRecorder
from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.core import native


def _model(widths=(16, 32, 8)) -> nn.Module:
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.LayerNorm(b)]
    return model_to_half(nn.Sequential(*layers))


def _backward(model, opt, n_in=16):
    x = torch.randn(4, n_in).half()
    opt.backward(model(x).float().square().mean())


def _sgd(model):  # its foreach update allocates nothing, so any allocation is ours
    return torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)


def test_flat_params_and_grads_are_views_into_buffers_that_stay_put():
    model = _model()
    opt = MixedPrecisionOptimizer(_sgd(model), 512.0, flat_master=True)
    (fg,) = opt._flat_groups
    # Linear (half) and LayerNorm (fp32) alternate: one buffer per run of one dtype
    assert [b.dtype for b in fg.data] == [torch.float16, torch.float32] * 2
    data_ptrs = [b.data_ptr() for b in fg.data + fg.grads]
    master_grad_ptrs = []
    for _ in range(3):
        _backward(model, opt)
        assert opt.step()
        opt.zero_grad()
        master_grad_ptrs.append(opt.master_params[0][0].grad.data_ptr())
    assert [b.data_ptr() for b in fg.data + fg.grads] == data_ptrs
    assert len(set(master_grad_ptrs)) == 1
    storages = {b.untyped_storage().data_ptr() for b in fg.data + fg.grads}
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() in storages
        assert p.grad.untyped_storage().data_ptr() in storages


@pytest.mark.parametrize("flat", [True, False])
def test_a_step_allocates_nothing_and_syncs_once(flat):
    model = _model()
    opt = MixedPrecisionOptimizer(_sgd(model), 512.0, flat_master=flat)
    for _ in range(2):  # the first step creates the master grads and the reused buffers
        _backward(model, opt)
        opt.step()
        opt.zero_grad()
    _backward(model, opt)
    with OpRecorder() as rec:
        assert opt.step()
    assert rec.allocations == []
    assert rec.host_syncs == 1


def test_flat_step_runs_a_fixed_number_of_kernels_whatever_the_parameter_count():
    counts = []
    for n_layers in (1, 8):  # 2 vs 16 parameters, all half: one buffer
        model = model_to_half(nn.Sequential(*[nn.Linear(16, 16) for _ in range(n_layers)]))
        opt = MixedPrecisionOptimizer(_sgd(model), 512.0, flat_master=True)
        assert len(opt._flat_groups[0].data) == 1
        _backward(model, opt)
        opt.step()
        _backward(model, opt)
        with OpRecorder() as rec:
            opt.step()
        counts.append({op: rec.count(op) for op in set(rec.ops)})
    small, large = counts
    assert small == large, "the step's kernels must not grow with the number of parameters"
    # one copy each way (grads to master, master to model), one fused check + unscale
    assert small["_foreach_copy_"] == 2
    assert small["_amp_foreach_non_finite_check_and_unscale_"] == 1


def test_fused_step_allocates_no_parameter_sized_memory_and_syncs_once():
    model = _model((64, 128, 64))
    n = sum(p.numel() for p in model.parameters())
    for clip in (None, 1.0):
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters()), 512.0, flat_master=True, fused=True, clip=clip
        )
        for _ in range(2):
            _backward(model, opt, 64)
            opt.step()
        _backward(model, opt, 64)
        with OpRecorder() as rec:
            assert opt.step()
        assert rec.host_syncs == 1
        assert sum(b for _, b in rec.allocations) < 1024 < 4 * n
        # one kernel: mixprec's native one on CPU (its fp32 LayerNorms too), else torch's
        native_step = clip is None and native.library() is not None
        assert rec.count("_fused_adamw_") == (0 if native_step else 1)
        model = _model((64, 128, 64))
