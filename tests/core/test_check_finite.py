"""check_finite_: the fused check's answer, from one read of each gradient."""

import pytest
import torch
from torch import nn

from helpers.dispatch import OpRecorder
from mixprec import MixedPrecisionOptimizer
from mixprec.core import native
from mixprec.core.scaler import SUM_CHECK_MIN_NUMEL, check_finite_

BIG = SUM_CHECK_MIN_NUMEL  # summed when the native check is not there (bf16 and fp32)
SMALL = 64  # the fused check when the native check is not there


@pytest.fixture(params=["native", "torch ops"])
def path(request, monkeypatch):
    """The native check, or the torch-op one a machine without a C compiler runs."""
    if request.param == "native":
        if native.library() is None:
            pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    else:
        monkeypatch.setattr(native, "library", lambda: None)
    return request.param


def _fused_check(grads):
    found = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_(
        [g.clone() for g in grads], found, torch.ones(1)
    )
    return found


def _grads(dtype, bad, where, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g).to(dtype) for n in (BIG, SMALL, BIG + 3)]
    if bad is not None:
        grads[where][where * 7 + 1] = bad
    return grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["big", "small", "big_odd"])
def test_answers_as_the_fused_check_and_leaves_the_values(path, dtype, bad, where):
    grads = _grads(dtype, bad, where)
    before = [g.clone() for g in grads]
    found = torch.zeros(1)
    check_finite_(grads, found)
    assert found.item() == _fused_check(grads).item() == (0.0 if bad is None else 1.0)
    for a, b in zip(grads, before):  # a nan stays a nan (the fused check may quiet it)
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a[~a.isnan()].view(torch.uint8), b[~b.isnan()].view(torch.uint8))


def test_the_native_check_over_every_16_bit_pattern():
    """Every bf16 and fp16 bit pattern, alone among finite values: flagged iff not finite."""
    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = patterns.view(dtype)
        flagged = [native.any_nonfinite([values[i : i + 1]]) for i in range(0, 2**16, 1)]
        assert torch.equal(torch.tensor(flagged), ~torch.isfinite(values.float()))
        assert native.any_nonfinite([values]) and not native.any_nonfinite(
            [values[torch.isfinite(values.float())]]
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_native_check_finds_one_bad_value_wherever_it_lies(dtype):
    """In any lane of any 64-byte line, in the tail after the last line, in any tensor."""
    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    clean = [torch.ones(n, dtype=dtype) for n in (3, 100, 4096 + 37)]
    assert not native.any_nonfinite(clean)
    for which, grad in enumerate(clean):
        for i in list(range(min(grad.numel(), 100))) + list(range(4096, grad.numel())):
            grads = [g.clone() for g in clean]
            grads[which][i] = float("nan") if i % 2 else float("-inf")
            assert native.any_nonfinite(grads), (which, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_gradient_whose_sum_overflows_is_no_overflow(path, dtype):
    big = torch.full((BIG,), torch.finfo(dtype).max / 4).to(dtype)  # sums to inf, all finite
    assert not torch.isfinite(big.sum())
    found = torch.zeros(1)
    with OpRecorder() as rec:
        check_finite_([big], found)
    assert found.item() == 0.0
    # without the native check, the sum's inf sends the gradient through the exact check
    assert rec.count("_amp_foreach_non_finite_check_and_unscale_") == (path == "torch ops")
    big[5] = float("-inf")
    check_finite_([big], found)
    assert found.item() == 1.0


def test_a_clean_large_gradient_is_only_read(path):
    grads = _grads(torch.bfloat16, None, 0)[:1]
    found = torch.zeros(1)
    with OpRecorder() as rec:
        check_finite_(grads, found)
    assert rec.count("_amp_foreach_non_finite_check_and_unscale_") == 0
    if path == "native":
        assert rec.ops == []  # no torch op at all: one read in the native kernel
    else:
        assert rec.count("sum") >= 1  # each gradient's, then their total


def test_an_earlier_overflow_is_kept(path):
    found = torch.ones(1)
    check_finite_(_grads(torch.bfloat16, None, 0), found)
    assert found.item() == 1.0


@pytest.mark.parametrize("bad", [None, float("-inf"), "huge"])
def test_fused_step_on_a_large_bf16_layer_decides_as_the_unfused_step(path, bad):
    """The fused step checks this layer's gradient with check_finite_; the unfused path
    unscales with the fused check: both take or skip the step alike, with the same masters."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(256, BIG // 256, bias=False)
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-3, fused=not fused),
            model=model,
            dtype=torch.bfloat16,
            fused=fused,
        )
        (p,) = model.parameters()
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p.dtype)
        if bad == "huge":  # finite, but the gradient's sum overflows
            g.fill_(torch.finfo(torch.bfloat16).max / 4)
        elif bad is not None:
            g[3, 4] = bad
        p.grad = g
        taken = opt.step()
        results.append((taken, opt.master_values()[id(p)].clone()))
    (taken_a, master_a), (taken_b, master_b) = results
    assert taken_a == taken_b == (bad != float("-inf"))
    assert torch.equal(master_a, master_b)
