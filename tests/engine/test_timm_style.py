"""timm-style nets (channels_last ResNet, ConvNeXt with LayerNorm2d and layer-scale gammas,
ViT with a root-owned cls_token) under mixprec: norms fp32, channels_last kept, bf16 tracks
fp32, and the advice `plan()` prints for fp16 can be followed as printed."""

import copy
import re

import pytest
import torch

from helpers.timm_style import MODELS, ConvNeXt, GlobalResponseNorm, LayerNorm2d
from mixprec import MixedPrecisionOptimizer, PrecisionPolicy, model_to_half, plan
from mixprec.core.master import flat_views

STEPS = 5


def _build(name):
    torch.manual_seed(0)
    return MODELS[name]()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 4, (4,), generator=g)


def _train(model, opt, dtype=None):
    x, y = _batch()
    x = x if dtype is None else x.to(dtype)
    losses = []
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        losses.append(loss.item())
        if isinstance(opt, MixedPrecisionOptimizer):
            opt.backward(loss)
            assert opt.step()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_tracks_fp32_with_norms_fp32_and_channels_last_kept(name):
    ref = _build(name)
    model = copy.deepcopy(ref)
    exact = [p.detach().clone() for p in model.parameters()]
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        model=model,
        dtype=torch.bfloat16,
        flat_master=True,
    )
    flat = opt.master_params[0][0].detach()
    assert all(torch.equal(v, e) for v, e in zip(flat_views(flat, exact), exact))
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, GlobalResponseNorm)
    kept = [m for m in model.modules() if isinstance(m, norms)]
    assert kept and all(p.dtype == torch.float32 for m in kept for p in m.parameters())
    assert all(b.dtype == torch.float32 for m in kept for b in m.buffers() if b.is_floating_point())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.dtype == torch.bfloat16 for c in convs)
    if name != "vit":
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    fp32 = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2))
    bf16 = _train(model, opt, torch.bfloat16)
    assert bf16[-1] < bf16[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.03 * fp32[-1], (fp32, bf16)


def _advice(result):
    return re.findall(r"PrecisionPolicy\(\)\.keep\('([^']+)'\)", "\n".join(result.warnings))


@pytest.mark.parametrize(
    ("name", "expected"), [("convnext", "stages.0.gamma"), ("vit", "cls_token")]
)
def test_the_printed_fp16_advice_can_be_followed(name, expected):
    model = _build(name)
    result = plan(model)  # fp16
    rules = _advice(result)
    assert expected in rules, result.warnings
    assert any("subnormals" in w for w in result.warnings)
    policy = PrecisionPolicy().keep(*rules)  # exactly as printed
    after = plan(model, policy)
    assert after.warnings == ()
    values = dict(model.named_parameters())[expected].detach().clone()
    model_to_half(model, torch.float16, policy)
    kept = dict(model.named_parameters())[expected]
    assert kept.dtype == torch.float32 and torch.equal(kept, values)
    x = _batch()[0].to(torch.float16)
    out = model(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    (summary,) = [w for w in result.warnings if "at once" in w]
    call = summary[summary.index("PrecisionPolicy()") :].rstrip(".")
    at_once = eval(call, {"PrecisionPolicy": PrecisionPolicy})  # the summary, as printed
    assert plan(_build(name), at_once).warnings == ()
    assert torch.isfinite(model_to_half(_build(name), torch.float16, at_once)(x)).all()


def test_a_parameter_kept_by_name_is_reported_and_its_owner_hands_half_on():
    model = _build("convnext")
    rows = {m.name: m for m in plan(model, PrecisionPolicy().keep("*.gamma")).modules}
    assert rows["stages.0"].fp32_params == "param gamma: name '*.gamma'"
    assert rows["stages.0"].dtype == torch.float16 and rows["stages.0"].rule == ""
    assert rows["stem.1"].rule == "type LayerNorm"  # LayerNorm2d subclasses nn.LayerNorm
    assert rows["stages.0.grn"].rule == "norm class name"  # GlobalResponseNorm: its class name
    assert isinstance(model.stem[1], LayerNorm2d) and isinstance(model, ConvNeXt)
    model_to_half(model, torch.bfloat16, PrecisionPolicy().keep("*.gamma"))
    seen = {}
    model.stages[1].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].dtype))
    model(_batch()[0].to(torch.bfloat16))
    assert seen["x"] == torch.bfloat16 and model.stages[0].gamma.dtype == torch.float32
