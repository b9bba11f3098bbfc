import copy
import json

import pytest
import torch
from torch import nn

from mixprec import PrecisionPolicy, model_to_half, plan
from mixprec.cli.demo.data import digits_cnn
from mixprec.cli.demo.transformer import tiny_transformer
from mixprec.core.policy import NORM_TYPES
from mixprec.inspect.planning import Plan


def test_plan_of_the_digits_cnn_under_the_default_policy():
    model = digits_cnn()
    result = plan(model)
    assert isinstance(result, Plan) and result.dtype == torch.float16
    assert result.fp32_modules == ["1", "4"]  # the BatchNorms
    rows = {m.name: m for m in result.modules}
    assert list(rows) == [str(i) for i in range(9)]
    assert rows["0"].dtype == torch.float16 and rows["1"].rule == "type _BatchNorm"
    n = sum(p.numel() for p in model.parameters())
    bn = sum(
        p.numel() for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()
    )
    assert result.bytes_before == 4 * n
    assert result.bytes_after == 2 * (n - bn) + 4 * bn
    assert result.master_bytes == 4 * n
    assert result.warnings == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plan_predicts_what_model_to_half_does(dtype):
    policy = PrecisionPolicy().keep("head", "*.attn.softmax")
    model = tiny_transformer()
    result = plan(model, policy, dtype)
    converted = model_to_half(copy.deepcopy(model), dtype, policy)
    modules = dict(converted.named_modules())
    for row in result.modules:
        for p in modules[row.name].parameters(recurse=False):
            assert p.dtype == row.dtype, row.name
    assert result.bytes_after == sum(p.numel() * p.element_size() for p in converted.parameters())
    rows = {m.name: m for m in result.modules}
    assert rows["blocks.1.attn.softmax"].rule == "name '*.attn.softmax'"
    assert rows["head"].dtype == torch.float32
    assert "blocks" not in rows and "blocks.0.attn" not in rows  # containers: children listed


def test_plan_does_not_modify_the_model():
    model = tiny_transformer()
    model.blocks[0].mlp[0].weight.data[0, 0] = 1e6  # would overflow: plan must only report it
    before = copy.deepcopy(model.state_dict())
    plan(model, PrecisionPolicy().keep("head"))
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before
    )
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_subtree_kept_by_name_reports_its_members():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    rows = {m.name: m for m in plan(model, PrecisionPolicy(("1",))).modules}
    assert rows["1"].rule == "name '1'" and rows["1.0"].rule == "in 1"
    assert rows["1.1"].dtype == torch.float32 and rows["0"].dtype == torch.float16


def test_weights_beyond_the_fp16_range_are_warned_about_unless_kept_or_bf16():
    model = digits_cnn()
    model[8].weight.data[0, :3] = torch.tensor([7e4, -1e6, 1.0])
    (warning,) = plan(model).warnings
    assert "8.weight: 2 value(s) beyond the float16 range (max |w| = 1e+06 > 65504)" in warning
    assert "PrecisionPolicy().keep('8')" in warning
    assert plan(model, PrecisionPolicy().keep("8")).warnings == ()
    assert plan(model, dtype=torch.bfloat16).warnings == ()


def test_weights_that_would_flush_to_zero_are_warned_about():
    model = digits_cnn()
    model[0].bias.data.fill_(1e-9)  # below fp16's smallest subnormal (6e-8)
    (warning,) = plan(model).warnings
    assert "0.bias: 16 of 16 nonzero value(s) are too small for float16" in warning
    assert "flush to zero" in warning
    model = digits_cnn()
    model[8].weight.data[0, 0] = 1e-9  # one tiny value among 5120: harmless, not reported
    assert plan(model).warnings == ()


def test_non_finite_weights_are_reported():
    model = digits_cnn()
    model[3].weight.data[0, 0, 0, 0] = float("nan")
    assert plan(model).warnings == ("3.weight already holds 1 inf/nan value(s).",)


def test_a_bf16_model_about_to_train_in_fp16_is_warned_about():
    model = digits_cnn().to(torch.bfloat16)
    (warning,) = plan(model).warnings
    assert warning.startswith(
        "10,026 parameter values are stored in bfloat16 and would be trained in float16"
    )
    assert "dtype=torch.bfloat16" in warning
    assert plan(model, dtype=torch.bfloat16).warnings == ()


def test_a_model_upcast_from_bf16_weights_is_recognised():
    model = digits_cnn().to(torch.bfloat16).float()
    (warning,) = plan(model).warnings
    assert "looks loaded from bf16 weights" in warning
    assert plan(digits_cnn()).warnings == ()  # fresh fp32 weights are not bf16 values


def test_a_half_model_can_be_planned_again():
    model = model_to_half(digits_cnn())
    result = plan(model)
    assert result.bytes_before == result.bytes_after


def test_printing_and_json():
    result = plan(tiny_transformer(), PrecisionPolicy().keep("head"))
    text = str(result)
    assert text.startswith(
        "plan: TinyTransformer to float16; fp32 kept for norm layers, HF _keep_in_fp32_modules, 'head'"
    )
    assert "blocks.0.attn.qkv" in text and "name 'head'" in text and "warnings: none" in text
    assert str(plan(digits_cnn(), PrecisionPolicy((nn.BatchNorm2d, "8")))).startswith(
        "plan: Sequential to float16; fp32 kept for BatchNorm2d, '8'\n"
    )
    assert "fp32 kept for nothing" in str(plan(digits_cnn(), PrecisionPolicy(())))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["dtype"] == "float16" and data["bytes_after"] == result.bytes_after
    assert {m["name"]: m["dtype"] for m in data["modules"]}["head"] == "float32"


def test_unmatched_patterns_are_warnings_when_not_strict():
    policy = PrecisionPolicy(strict=False).keep("classifier")
    assert plan(digits_cnn(), policy).warnings == (
        "fp32 pattern 'classifier' matches no module or parameter of Sequential.",
    )
    with pytest.raises(ValueError, match="'classifier' match no module"):
        plan(digits_cnn(), PrecisionPolicy().keep("classifier"))


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="policy must be a PrecisionPolicy or None; got tuple"):
        plan(digits_cnn(), (nn.LayerNorm,))
    with pytest.raises(ValueError, match="dtype must be one of"):
        plan(digits_cnn(), dtype=torch.float32)
