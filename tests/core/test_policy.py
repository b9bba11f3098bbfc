import pytest
import torch
from torch import nn

from mixprec import MixedPrecisionOptimizer, PrecisionPolicy, model_to_float, model_to_half
from mixprec.cli.demo.transformer import tiny_transformer
from mixprec.core.policy import DEFAULT_FP32, NORM_TYPES


def _net():
    return nn.Sequential(
        nn.Linear(3, 8),
        nn.LayerNorm(8),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
    )


def _dtypes(model):
    return {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _hooked(model):
    return sorted(n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks)


def test_default_policy_converts_exactly_like_the_default_tuple():
    a, b = _net(), _net()
    model_to_half(a)
    model_to_half(b, keep_fp32=PrecisionPolicy())
    assert PrecisionPolicy().rules == DEFAULT_FP32 and set(NORM_TYPES) < set(DEFAULT_FP32)
    assert _dtypes(a) == _dtypes(b) and _hooked(a) == _hooked(b) == ["1"]
    assert _dtypes(a)["1.weight"] == torch.float32 and _dtypes(a)["0.weight"] == torch.float16


def test_a_name_rule_keeps_the_whole_subtree_fp32_casting_only_at_its_boundary():
    model = model_to_half(_net(), keep_fp32=PrecisionPolicy().keep("2"))
    assert {t.dtype for t in model[2].parameters()} == {torch.float32}
    assert model[0].weight.dtype == torch.float16
    assert _hooked(model) == ["1", "2"]  # not 2.0 / 2.2: fp32 all the way inside the head
    seen = {}
    model[2][2].register_forward_pre_hook(lambda m, args: seen.update(input=args[0].dtype))
    out = model(torch.randn(4, 3, dtype=torch.float16))
    assert seen["input"] == torch.float32 and out.dtype == torch.float16
    out.float().sum().backward()
    assert model[2][0].weight.grad.dtype == torch.float32
    assert model[0].weight.grad.dtype == torch.float16


def test_glob_patterns_match_qualified_names():
    model = tiny_transformer()
    policy = PrecisionPolicy().keep("head", "*.attn.softmax")
    roots = policy.fp32_roots(model)
    assert [n for n in roots if not isinstance(roots[n][1], type)] == [
        "blocks.0.attn.softmax",
        "blocks.1.attn.softmax",
        "head",
    ]
    assert roots["head"][1] == "head" and roots["blocks.0.ln1"][1] is nn.LayerNorm
    model_to_half(model, keep_fp32=policy)
    softmax_in = []
    model.blocks[0].attn.softmax.register_forward_hook(
        lambda m, args, out: softmax_in.append((args[0].dtype, out.dtype))
    )
    out = model(torch.randint(0, 64, (2, 16)))
    # the softmax computes in fp32; its output is cast back for the half matmul after it
    assert softmax_in == [(torch.float32, torch.float16)] and out.dtype == torch.float16
    assert model.head.weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float16


def test_a_policy_trains_with_the_optimizer():
    model = model_to_half(tiny_transformer(), keep_fp32=PrecisionPolicy().keep("head"))
    opt = MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 128.0)
    head_before = model.head.weight.detach().clone()
    ids, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 10, (4,))
    opt.backward(nn.functional.cross_entropy(model(ids).float(), y))
    assert opt.step()
    assert model.head.weight.dtype == torch.float32
    assert not torch.equal(model.head.weight, head_before)


def test_a_container_type_in_the_tuple_now_runs_in_fp32():
    class Head(nn.Sequential):
        pass

    model = nn.Sequential(nn.Linear(3, 4), Head(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    model_to_half(model, keep_fp32=(Head,))
    assert {p.dtype for p in model[1].parameters()} == {torch.float32}
    assert model(torch.randn(2, 3, dtype=torch.float16)).dtype == torch.float16


def test_a_shared_module_can_be_named_by_any_of_its_paths():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    model_to_half(model, keep_fp32=PrecisionPolicy(("2.0",)))
    assert shared.weight.dtype == torch.float32
    assert model(torch.randn(2, 4, dtype=torch.float16)).dtype == torch.float16


def test_changing_the_policy_reconverts_and_model_to_float_undoes_it():
    model = _net()
    model_to_half(model, keep_fp32=PrecisionPolicy().keep("2"))
    model_to_half(model, keep_fp32=PrecisionPolicy(("0",)))
    assert model[0].weight.dtype == torch.float32
    assert model[1].weight.dtype == model[2][0].weight.dtype == torch.float16
    assert _hooked(model) == ["0"]
    model_to_float(model)
    assert set(_dtypes(model).values()) == {torch.float32} and _hooked(model) == []


def test_keep_returns_a_new_policy():
    base = PrecisionPolicy()
    more = base.keep("head", nn.Linear, "head")
    assert base.rules == DEFAULT_FP32
    assert more.rules == (*DEFAULT_FP32, "head", nn.Linear)
    assert more.patterns == ("head",) and nn.Linear in more.types
    assert more == PrecisionPolicy((*DEFAULT_FP32, "head", nn.Linear)) and more != base
    assert "head" in repr(more) and "LayerNorm" in repr(more)


def test_a_typo_in_a_pattern_is_an_error_unless_not_strict():
    model = tiny_transformer()
    with pytest.raises(
        ValueError,
        match=r"'haed' match no module or parameter of TinyTransformer.*did you mean 'head'",
    ):
        model_to_half(model, keep_fp32=PrecisionPolicy().keep("haed"))
    assert model.head.weight.dtype == torch.float32  # nothing was converted
    lenient = PrecisionPolicy(strict=False).keep("haed")
    assert lenient.unmatched_patterns(model) == ["haed"]
    model_to_half(model, keep_fp32=lenient)
    assert model.head.weight.dtype == torch.float16


@pytest.mark.parametrize("pattern", ["", " head", "head.", ".head", "blocks..attn", "head[0"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="bad module name pattern"):
        PrecisionPolicy((pattern,))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (3, r"an fp32 rule must be an nn.Module subclass .* got 3 \(int\)"),
        (int, "an fp32 rule must be an nn.Module subclass"),
        (nn.LayerNorm(3), "Pass the class LayerNorm, not an instance"),
    ],
)
def test_bad_rule_types_are_refused(rule, message):
    with pytest.raises(TypeError, match=message):
        PrecisionPolicy((rule,))
    with pytest.raises(TypeError, match=message):
        model_to_half(_net(), keep_fp32=(rule,))


@pytest.mark.parametrize("single", ["head", nn.Linear])
def test_a_single_rule_must_be_wrapped(single):
    with pytest.raises(TypeError, match="Wrap it in a tuple"):
        PrecisionPolicy(single)
