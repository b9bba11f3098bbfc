from collections import namedtuple

import pytest
import torch
from torch import nn

from mixprec import model_to_float, model_to_half
from mixprec.core.convert import cast_floats
from mixprec.core.dtypes import check_half_dtype

NORMS = [
    nn.BatchNorm1d(4),
    nn.BatchNorm2d(4),
    nn.BatchNorm3d(4),
    nn.SyncBatchNorm(4),
    nn.BatchNorm2d(4, affine=False),
    nn.LayerNorm(4),
    nn.GroupNorm(2, 4),
    nn.InstanceNorm2d(4, affine=True),
    nn.RMSNorm(4),
]


@pytest.mark.parametrize("norm", NORMS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_layers_and_their_buffers_stay_fp32(norm, dtype):
    model = nn.Sequential(nn.Linear(4, 4), norm)
    assert model_to_half(model, dtype) is model
    assert model[0].weight.dtype == dtype
    floats = [t for t in [*norm.parameters(), *norm.buffers()] if t.is_floating_point()]
    assert all(t.dtype == torch.float32 for t in floats)


def test_frozen_batchnorm_stays_fp32():
    bn = nn.BatchNorm2d(3)
    bn.requires_grad_(False)
    model_to_half(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    assert bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == torch.float32


def test_half_forward_takes_and_returns_half():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 2),
    )
    model_to_half(model)
    out = model(torch.randn(2, 1, 4, 4, dtype=torch.float16))
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32
    assert model[0].weight.grad.dtype == torch.float16


def test_keep_fp32_is_configurable_and_conversion_is_idempotent():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model_to_half(model, keep_fp32=(nn.LayerNorm,))
    model_to_half(model, keep_fp32=(nn.LayerNorm,))  # hooks are not stacked
    assert len(model[1]._forward_pre_hooks) == 1
    model_to_half(model, keep_fp32=())
    assert model[1].weight.dtype == torch.float16 and not model[1]._forward_pre_hooks


def test_model_to_float_restores_fp32_and_removes_hooks():
    model = model_to_half(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    model_to_float(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks
    assert model(torch.randn(2, 3)).dtype == torch.float32


def test_parameter_identity_is_kept():
    model = nn.Linear(3, 3)
    weight = model.weight
    model_to_half(model)
    assert model.weight is weight


def test_cast_floats_converts_only_floating_tensors_in_nested_containers():
    Pair = namedtuple("Pair", "x mask")
    batch = {
        "x": torch.randn(2),
        "ids": torch.tensor([1, 2]),
        "mask": torch.tensor([True, False]),
        "nested": [(torch.randn(1, dtype=torch.float64), "name", 3)],
        "pair": Pair(torch.randn(1), torch.tensor([1])),
    }
    out = cast_floats(batch, torch.float16)
    assert out["x"].dtype == torch.float16
    assert out["ids"].dtype == torch.int64 and out["mask"].dtype == torch.bool
    assert out["nested"][0][0].dtype == torch.float16 and out["nested"][0][1:] == ("name", 3)
    assert isinstance(out["pair"], Pair) and out["pair"].mask.dtype == torch.int64
    assert out["pair"].x.dtype == torch.float16


@pytest.mark.parametrize(
    ("dtype", "error", "message"),
    [
        (
            torch.float32,
            ValueError,
            "dtype must be one of torch.float16, torch.bfloat16; got torch.float32",
        ),
        (torch.int8, ValueError, "dtype must be one of"),
        ("fp16", TypeError, "dtype must be a torch.dtype"),
    ],
)
def test_unsupported_dtypes_are_refused(dtype, error, message):
    with pytest.raises(error, match=message):
        check_half_dtype(dtype)
    with pytest.raises(error, match=message):
        model_to_half(nn.Linear(2, 2), dtype)


@pytest.mark.parametrize("convert", [model_to_half, model_to_float])
@pytest.mark.parametrize("model", ["not a module", None, [nn.Linear(2, 2)]], ids=repr)
def test_something_other_than_a_module_is_a_type_error_naming_it(convert, model):
    with pytest.raises(
        TypeError, match=rf"model must be an nn.Module .*; got {type(model).__name__}"
    ):
        convert(model)
