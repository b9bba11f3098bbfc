"""Split fp32 masters (bf16 weight + 16 low bits): exact reconstruction, and the fp32-master
path's numbers bit for bit over many steps with skips, clipping, accumulation and resume."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.core import native
from mixprec.core.split import join, join_, join_all_, split, split_, split_all_
from mixprec.engine import fused_adam
from mixprec.engine.fused_items import FusedItem


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64)


def _upper_tie(bits: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Masters `high * 2**16 + 2**15` (modulo 2**32): the one remainder int16 cannot hold."""
    d = _bits(bits.view(torch.float32)) - high.view(torch.int16).to(torch.int64) * 65536
    return ((d + 2**31) % 2**32 - 2**31) == 32768


def _check_roundtrip(bits: torch.Tensor) -> None:
    """Every master comes back exactly, but an upper tie (1 ulp towards its high part) and a
    nan (a nan); the high part is RNE(master) as torch rounds it."""
    master = bits.view(torch.float32)
    high, low = split(master)
    assert torch.equal(high.view(torch.int16), master.to(torch.bfloat16).view(torch.int16))
    back = join(high, low)
    nan = torch.isnan(master)
    assert torch.isnan(back[nan]).all()
    tie = _upper_tie(bits, high) & ~nan
    exact = ~nan & ~tie
    assert torch.equal(back.view(torch.int32)[exact], bits[exact])
    assert torch.equal(_bits(back[tie]), _bits(master[tie]) - 1)  # one ulp towards high
    same = back[~nan].to(torch.bfloat16).view(torch.int16) == high[~nan].view(torch.int16)
    assert same.all()  # the stored master rounds to the same weight
    ties = torch.zeros((), dtype=torch.int64)
    split_(master, torch.empty_like(high), torch.empty_like(low), ties=ties)
    assert int(ties) >= int(tie.sum())  # every tie counted (nans may count too)


def test_every_high_part_with_its_boundary_remainders():
    """All 65536 high parts (both signs, every exponent, subnormals, ±0, ±inf, nan) with the
    remainders at the edges of their rounding intervals and around zero."""
    high = torch.arange(-(2**15), 2**15, dtype=torch.int64)
    d = torch.tensor([-32768, -32767, -32766, -1, 0, 1, 32766, 32767, 32768])
    bits = (high[:, None] * 65536 + d[None, :]).reshape(-1)
    bits = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32)  # as int32 patterns
    _check_roundtrip(bits)
    # the exact special values
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4028235e38])
    assert torch.equal(join(*split(special)).view(torch.int32), special.view(torch.int32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=64))
def test_any_bit_pattern_round_trips(patterns):
    _check_roundtrip(torch.tensor(patterns, dtype=torch.int32))


def test_the_unrepresentable_tie_exists_only_for_even_high_parts():
    """Proof by construction of the counting argument: an even h owns both of its ties under
    RNE, an odd h neither, and int16 holds one of the two."""
    h_even, h_odd = 0x3F80, 0x3F81  # 1.0 and its bf16 successor
    for h, owns in ((h_even, True), (h_odd, False)):
        lo_tie = torch.tensor([h * 65536 - 32768], dtype=torch.int32).view(torch.float32)
        hi_tie = torch.tensor([h * 65536 + 32768], dtype=torch.int32).view(torch.float32)
        for tie in (lo_tie, hi_tie):
            assert (int(tie.to(torch.bfloat16).view(torch.int16)) == h) is owns
    up = torch.tensor([h_even * 65536 + 32768], dtype=torch.int32).view(torch.float32)
    back = join(*split(up))
    assert int(back.view(torch.int32)) == h_even * 65536 + 32767  # 1 ulp towards h


def test_join_and_split_refuse_wrong_dtypes_and_shapes():
    with pytest.raises(TypeError, match="bfloat16 high, int16 low"):
        join(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int16))
    with pytest.raises(ValueError, match="one shape"):
        join_(
            torch.empty(3), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int16)
        )


# -- the optimizer -----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 48), nn.LayerNorm(48), nn.ReLU())
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        y = self.conv(x[:, :32].reshape(-1, 2, 4, 4)).sum()
        return self.head(self.body(x[:, 32:40])) + y


def _setup(master, clip=None, seed=0, channels_last=False):
    torch.manual_seed(seed)
    model = model_to_half(Net(), torch.bfloat16)
    if channels_last:  # a parameter that is not contiguous: its own scratch
        model.conv.to(memory_format=torch.channels_last)
    groups = [
        {"params": [*model.body.parameters(), *model.conv.parameters()], "lr": 3e-2},
        {"params": model.head.parameters(), "lr": 1e-2, "weight_decay": 0.2},
    ]
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(groups), "dynamic", master=master, clip=clip, growth_interval=3,
    )  # fmt: skip
    opt.update.kernel.chunk = 40  # small chunks: tensors split over chunks, several per chunk
    opt.update.kernel.count_ties = True
    return model, opt


def _train(model, opt, steps, start=0, accumulate=1, unscale=False):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        for _ in range(accumulate):
            x = torch.randn(6, 40, generator=g).bfloat16()
            loss = model(x).float().square().mean()
            opt.backward(loss * float("inf") if i % 5 == 2 else loss)
        if unscale:
            opt.unscale_()
        opt.step()
        opt.zero_grad()


def _everything(model, opt):
    sd = opt.state_dict()
    tensors = [m for g in sd["masters"] for m in g] + list(model.parameters())
    tensors += [v for s in sd["optimizer"]["state"].values() for v in s.values()]
    return tensors, sd["scaler"]


def _assert_same(a, b):
    (ta, sa), (tb, sb) = a, b
    assert sa == sb
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"clip": 0.05},
        {"accumulate": 3},
        {"accumulate": 2, "clip": 0.05, "unscale": True},
        {"channels_last": True},
    ],
    ids=["plain", "clip", "accumulate", "accumulate-clip-unscale", "channels_last"],
)
def test_split_is_the_fp32_master_path_bit_for_bit(case):
    case = dict(case)
    build = {k: case.pop(k) for k in ("clip", "channels_last") if k in case}
    runs = []
    for master in ("fp32", "split"):
        model, opt = _setup(master, **build)
        _train(model, opt, 24, **case)
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    assert ob.skipped_steps == oa.skipped_steps > 0 and ob.scaler.scale == oa.scaler.scale
    ties = int(sum(ob.update.kernel.ties.values()))
    if ties == 0:  # no master landed on the one unrepresentable tie
        _assert_same(_everything(ma, oa), _everything(mb, ob))
    else:  # pragma: no cover - depends on the seeds; then agree to a few ulps
        for x, y in zip(*(_everything(m, o)[0] for m, o in runs)):
            torch.testing.assert_close(y.float(), x.float(), rtol=1e-5, atol=1e-6)
    assert all(v.dtype == torch.float32 for s in ob.optimizer.state.values() for v in s.values())


def test_state_dict_round_trip_and_resume_and_checkpoints_interchange_with_fp32():
    ref_model, ref = _setup("fp32")
    _train(ref_model, ref, 16)
    model, opt = _setup("split")
    _train(model, opt, 8)
    saved = opt.state_dict()
    for master in ("split", "fp32"):  # resume from a split checkpoint, in either layout
        m2, o2 = _setup(master, seed=1)
        o2.load_state_dict(copy.deepcopy(saved))  # torch's load may share tensors with it
        _train(m2, o2, 8, start=8)
        _assert_same(_everything(ref_model, ref), _everything(m2, o2))
    fp32_model, fp32_opt = _setup("fp32")  # and the other way round
    _train(fp32_model, fp32_opt, 8)
    m3, o3 = _setup("split", seed=2)
    o3.load_state_dict(fp32_opt.state_dict())
    _train(m3, o3, 8, start=8)
    _assert_same(_everything(ref_model, ref), _everything(m3, o3))


def test_split_keeps_14_bytes_a_bf16_parameter():
    model, opt = _setup("split")
    _train(model, opt, 3)
    bf16 = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    n = sum(p.numel() for p in bf16)
    weights = sum(p.numel() * p.element_size() for p in bf16)
    lows = sum(t.numel() * t.element_size() for t in opt.split.low.values())
    moments = sum(
        v.numel() * v.element_size()
        for p in bf16
        for v in opt.optimizer.state[p].values()
        if v.dim()
    )
    assert (weights + lows + moments) / n == 12  # + the bf16 gradient during backward: 14
    assert opt.split.acc == {} and all(p.grad is None for p in model.parameters())


def test_bad_split_options_are_refused():
    model = model_to_half(nn.Linear(4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="flat_master=True"):
        MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters()), master="split", flat_master=True
        )
    with pytest.raises(ValueError, match="fused=False"):
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), master="split", fused=False)
    with pytest.raises(ValueError, match=r"implements torch\.optim\.Adam and AdamW; got SGD"):
        MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), master="split")
    with pytest.raises(ValueError, match=r'master=\.\.\.\) must be "fp32" or "split"'):
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), master="bits")
    half = model_to_half(nn.Linear(4, 4), torch.float16)
    with pytest.raises(ValueError, match=r"dtype=torch\.float16\): split masters are bf16"):
        MixedPrecisionOptimizer(torch.optim.AdamW(half.parameters()), master="split")


def test_split_masters_from_an_fp32_model_start_at_its_exact_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    exact = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters()), model=model, dtype=torch.bfloat16, master="split"
    )
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    masters = [m for group in opt.state_dict()["masters"] for m in group]
    for (name, p), m in zip(model.named_parameters(), masters):
        assert torch.equal(m, exact[name]), name  # not the rounded bf16 copies
        assert torch.equal(p, exact[name].to(p.dtype)), name  # the forward sees RNE(master)
    with pytest.raises(
        ValueError, match=r"master='split', dtype=torch\.float16\): split masters are bf16"
    ):
        fp32 = nn.Linear(2, 2)
        MixedPrecisionOptimizer(torch.optim.AdamW(fp32.parameters()), model=fp32, master="split")


@pytest.mark.parametrize("count_ties", [False, True], ids=["uncounted", "ties_counted"])
def test_the_fused_step_stores_masters_as_split_does_at_every_boundary(count_ties):
    """The fused step's split and join of its rebuilt masters (the arithmetic over the
    chunk's whole scratch stretch, an fp32 parameter's stretch in between) against `split_`
    and `join`, on every high part's edges; ties counted over the split masters only."""
    high = torch.arange(-(2**15), 2**15, dtype=torch.int64)
    d = torch.tensor([-32768, -32767, -1, 0, 1, 32767, 32768])
    bits = (high[:, None] * 65536 + d[None, :]).reshape(-1)
    bits = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32)
    n = bits.numel() // 2
    params = [nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(3))]
    params.append(nn.Parameter(torch.zeros(bits.numel() - n, dtype=torch.bfloat16)))
    step = fused_adam.FusedAdamStep(torch.optim.AdamW(params), chunk=bits.numel() + 3)
    step.count_ties = count_ties
    step.use_native = False  # the passes of torch's path; the native kernel's own test below
    lows = {p: torch.zeros_like(p, dtype=torch.int16) for p in params if p.dtype != torch.float32}
    items = [
        FusedItem(p, p.detach(), None, torch.zeros_like(p), p.detach(), lows.get(p)) for p in params
    ]
    (chunk,) = step.plan([items], cache=False).chunks
    assert len(chunk.split_masters) == 2
    for m, part in zip(chunk.split_masters, bits.split([n, bits.numel() - n])):
        m.view(torch.int32).copy_(part)
    ties = torch.zeros((), dtype=torch.int64) if count_ties else None
    span = step._span(chunk)
    assert span is not None
    parts = (chunk.split_masters, chunk.split_highs, chunk.split_lows, chunk.split_work)
    split_all_(*parts, ties, span)
    expected_ties = torch.zeros((), dtype=torch.int64)
    want_high = torch.empty(bits.numel(), dtype=torch.bfloat16)
    want_low = torch.empty(bits.numel(), dtype=torch.int16)
    split_(bits.view(torch.float32), want_high, want_low, ties=expected_ties)
    got_high = torch.cat([params[0].detach(), params[2].detach()])
    got_low = torch.cat([lows[params[0]], lows[params[2]]])
    assert torch.equal(got_high.view(torch.int16), want_high.view(torch.int16))
    assert torch.equal(got_low, want_low)
    if count_ties:
        assert int(ties) == int(expected_ties) > 0
    for m in chunk.split_masters:
        m.zero_()
    join_all_(*parts, span)
    rebuilt = torch.cat([m.view(torch.int32) for m in chunk.split_masters])
    assert torch.equal(rebuilt, join(want_high, want_low).view(torch.int32))


def test_the_native_kernel_stores_masters_as_torchs_passes_do_at_every_boundary():
    """The native split (shared by the native Adam step) against the torch-op passes, on
    every high part's edges, the infinities and nans included."""
    lib = native.library()
    if lib is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    high = torch.arange(-(2**15), 2**15, dtype=torch.int64)
    d = torch.tensor([-32768, -32767, -1, 0, 1, 32767, 32768])
    bits = (high[:, None] * 65536 + d[None, :]).reshape(-1)
    master = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)
    want_high = torch.empty(master.numel(), dtype=torch.bfloat16)
    want_low = torch.empty(master.numel(), dtype=torch.int16)
    split_all_([master], [want_high], [want_low], [torch.empty_like(master, dtype=torch.int32)])
    got_high, got_low = torch.empty_like(want_high), torch.empty_like(want_low)
    split_(master, got_high, got_low)  # the native pass
    nan = master.isnan()
    assert torch.equal(got_high.isnan(), nan)  # a nan stays a nan (its payload may differ)
    assert torch.equal(got_high.view(torch.int16)[~nan], want_high.view(torch.int16)[~nan])
    assert torch.equal(got_low[~nan], want_low[~nan])
    assert torch.equal(join(got_high, got_low)[~nan], join(want_high, want_low)[~nan])
