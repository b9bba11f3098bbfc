"""The gradient-range diagnostic: histogram shares against real casts, and `diagnose` on models
built to underflow and to overflow."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mixprec
from mixprec.inspect.diagnose import GradientHistogram, GradientRange, diagnose


def _values(low: int, high: int, n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Signed m * 2**e with e uniform in [low, high] and m in (1, 1.5): no value sits on a
    rounding tie or rounds up into the next octave, so bin-based shares are exact."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(low, high + 1, (n,), generator=g).double()
    m = 1.0 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * m * torch.exp2(e)).float()


def _cast_shares(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    y = (x.double() * scale).float().to(dtype)
    smallest_normal = torch.finfo(dtype).smallest_normal
    n = x.numel()
    return {
        "underflow": (y == 0).sum().item() / n,
        "subnormal": ((y != 0) & (y.abs() < smallest_normal)).sum().item() / n,
        "overflow": y.isinf().sum().item() / n,
    }


@pytest.mark.parametrize("scale", [1.0, 2.0**-6, 2.0**10])
def test_fp16_shares_match_real_casts(scale):
    x = _values(-40, 24)
    shares = GradientHistogram().add_(x).shares("fp16", scale)
    expected = _cast_shares(x, torch.float16, scale)
    for key in ("underflow", "subnormal", "overflow"):
        assert shares[key] == pytest.approx(expected[key], abs=0), key
    assert 0 < shares["underflow"] < 1 and 0 < shares["overflow"] < 1


def test_bf16_shares_match_real_casts():
    x = _values(-140, -110)
    shares = GradientHistogram().add_(x).shares("bf16")
    expected = _cast_shares(x, torch.bfloat16)
    assert shares["underflow"] == pytest.approx(expected["underflow"], abs=0)
    assert shares["underflow"] > 0.1
    assert GradientHistogram().add_(_values(-60, 60)).shares("bf16")["underflow"] == 0


def test_histogram_counts_zeros_and_nonfinite_apart():
    h = GradientHistogram().add_(torch.tensor([0.0, 0.0, 1.0, 3.0, -0.25, float("inf"), math.nan]))
    assert (h.zeros, h.nonfinite, h.nonzero, h.total) == (2, 2, 3, 7)
    assert h.exponent_range() == (-2, 0, 1)
    assert h.to_dict()["counts"] == {-2: 1, 0: 1, 1: 1}
    assert h.shares()["zero"] == pytest.approx(2 / 7)


def test_scale_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        GradientHistogram().add_(torch.ones(3)).shares("fp16", 3.0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        GradientHistogram().shares("fp8")


def test_scale_range_is_the_widest_range_within_the_thresholds():
    h = GradientHistogram().add_(_values(-30, -5))
    lo, hi = h.scale_exponents("fp16", 1e-3, 0.0)
    for k, ok in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
        s = h.shares("fp16", 2.0**k)
        assert (s["underflow"] <= 1e-3 and s["overflow"] == 0) is ok, k
    # the values span 26 octaves; fp16 holds 2**-25 .. 2**16 without loss
    assert GradientHistogram().add_(_values(-60, 0)).scale_exponents("fp16", 1e-3, 0.0) is None


class _Mlp(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)
        self.scale = scale

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x)))) * self.scale


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_diagnose_on_a_model_built_to_underflow():
    torch.manual_seed(0)
    model = _Mlp()
    plain = diagnose(model, _batch(), F.cross_entropy)
    tiny = diagnose(model, _batch(), lambda out, y: F.cross_entropy(out, y) * 2.0**-30)
    assert plain.shares()["underflow"] < 0.01
    assert tiny.shares("activations")["underflow"] > 0.9
    assert tiny.shares("weights")["underflow"] > 0.5
    assert tiny.shares(fmt="bf16")["underflow"] == 0
    # a power-of-two loss weight shifts every gradient exactly: the scale range moves by 2**30
    lo, hi = plain.scale_range()
    assert tiny.scale_range() == (lo * 2.0**30, hi * 2.0**30)
    assert tiny.shares(scale=2.0**30) == plain.shares()
    assert "no loss scale" not in tiny.summary() and "2^" in tiny.summary()


def test_diagnose_on_a_model_built_to_overflow():
    torch.manual_seed(0)
    result = diagnose(_Mlp(scale=2.0**14), _batch(), lambda out, y: (out**2).mean() * 2.0**10)
    assert result.shares()["overflow"] > 0.01
    assert result.shares(fmt="bf16")["overflow"] == 0
    _, hi = result.scale_range()
    assert hi < 1.0  # only a scale below 1 brings every value under 65504
    assert result.shares(scale=hi)["overflow"] == 0 < result.shares(scale=2 * hi)["overflow"]


def test_diagnose_leaves_the_model_and_the_rng_untouched():
    torch.manual_seed(0)
    model = _Mlp()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    result = diagnose(nn.Sequential(model, nn.Dropout(0.5)), _batch(), F.cross_entropy)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert set(result.activations) >= {"0.body.0", "0.body.2", "0.norm", "0.head", "0", "1"}
    assert "0.body.1" not in result.activations  # in-place ReLU: its output is body.0's tensor
    assert set(result.weights) == {n for n, _ in nn.Sequential(model).named_parameters()}


def test_diagnose_a_half_model_measures_its_fp32_twin():
    torch.manual_seed(0)
    reference = _Mlp()
    half = mixprec.model_to_half(_Mlp().requires_grad_(True), torch.float16)
    half.load_state_dict(
        {k: v.to(half.state_dict()[k].dtype) for k, v in reference.state_dict().items()}
    )
    x, y = _batch()
    result = diagnose(half, (x.half(), y), F.cross_entropy)
    assert next(half.parameters()).dtype == torch.float16
    assert half(x.half()).dtype == torch.float16  # the fp32-norm hooks are still in place
    assert math.isfinite(result.loss) and result.histogram().nonzero > 0


def test_diagnose_takes_several_inputs_and_checks_its_arguments():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    x1, x2, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 2, (5,))
    result = diagnose(Two(), ((x1, x2), y), F.cross_entropy)
    assert {"a.weight", "b.weight"} <= set(result.weights)
    with pytest.raises(TypeError, match=r"batch must be a pair \(input, target\)"):
        diagnose(Two(), x1, F.cross_entropy)
    with pytest.raises(ValueError, match="loss_func must return a scalar"):
        diagnose(nn.Linear(4, 2), (x1, y), lambda out, t: out)
    with pytest.raises(ValueError, match=r"underflow_threshold must be a share in \[0, 1\)"):
        diagnose(nn.Linear(4, 2), (x1, y), F.cross_entropy, underflow_threshold=2)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        diagnose(lambda x: x, (x1, y), F.cross_entropy)


def test_result_summary_json_and_plot(tmp_path):
    torch.manual_seed(0)
    result = diagnose(_Mlp(), _batch(), lambda out, y: F.cross_entropy(out, y) * 2.0**-20)
    assert isinstance(result, GradientRange) and mixprec.diagnose is diagnose
    text = str(result)
    assert "fp16: loss scales 2^" in text and "Most fp16 underflow at scale 1" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["all"]["fp16"]["underflow"] == pytest.approx(result.shares()["underflow"])
    assert data["scale_range"]["fp16"] == list(result.scale_range())
    path = result.plot(tmp_path / "grads.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
