"""The native one-pass Adam(W) step: torch's path's numbers, bit for bit, in every layout."""

import copy

import pytest
import torch
from torch import nn

from helpers.dispatch import OpRecorder
from mixprec import AutocastOptimizer, MixedPrecisionOptimizer
from mixprec.core import native
from mixprec.engine import native_adam

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native kernels here: {native.unavailable_reason()}"
)

CONFIGS = {
    "bf16": dict(opt=(torch.optim.AdamW, {"weight_decay": 0.1}), dtype=torch.bfloat16),
    "bf16_flat": dict(
        opt=(torch.optim.AdamW, {"weight_decay": 0.1}), dtype=torch.bfloat16, flat_master=True
    ),
    "split": dict(opt=(torch.optim.AdamW, {}), dtype=torch.bfloat16, master="split"),
    "fp16_dynamic": dict(
        opt=(torch.optim.AdamW, {"weight_decay": 0.01}), dtype=torch.float16, loss_scale="dynamic"
    ),
    "adam_l2_amsgrad_maximize": dict(
        opt=(torch.optim.Adam, {"weight_decay": 0.05, "amsgrad": True, "maximize": True}),
        dtype=torch.bfloat16,
        loss_scale=8.0,
    ),
    "split_adam_amsgrad": dict(
        opt=(torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.02}),
        dtype=torch.bfloat16,
        master="split",
    ),
}


def _model(width: int = 24, seed: int = 0) -> nn.Module:
    # 24 x 72 weights: native; 72 biases and the fp32 LayerNorm's 72 weights and biases: 64
    # native, 8 on torch's kernel; the last layer's 288 weights: 256 and 32; its 4 biases:
    # torch's kernel
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 72), nn.LayerNorm(72), nn.ReLU(), nn.Linear(72, 4))


def _run(config, native_on, steps=5, width=24, inf_step=2, threads=None):
    model = _model(width)
    opt_cls, kw = config["opt"]
    groups = [
        {"params": model[0].parameters(), "lr": 1e-2},
        {"params": [*model[1].parameters(), *model[3].parameters()], "lr": 3e-3},
    ]
    extra = {k: v for k, v in config.items() if k not in ("opt", "dtype")}
    opt = MixedPrecisionOptimizer(
        opt_cls(groups, **kw), model=model, dtype=config["dtype"], **extra
    )
    opt.update.kernel.use_native = native_on
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(6, width, generator=g).to(config["dtype"])
        loss = (model(x).float() - torch.randn(6, 4, generator=g)).square().mean()
        opt.backward(loss * float("inf") if i == inf_step else loss)
        if threads is not None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            taken = opt.step()
        finally:
            if threads is not None:
                torch.set_num_threads(before)
        cache = opt.update.kernel._cache
        used.append(bool(cache and cache[1].natives))
        if taken:
            sched.step()
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    return state, weights, used, opt


def _bf16_adamw(native_on):
    model = _model()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )
    opt.update.kernel.use_native = native_on
    return model, opt


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_same(a, b):
    (state_a, weights_a, _, opt_a), (state_b, weights_b, _, opt_b) = a, b
    for wa, wb in zip(weights_a, weights_b):
        assert torch.equal(_bits(wa), _bits(wb))
    for ma, mb in zip(opt_a.master_values().values(), opt_b.master_values().values()):
        assert torch.equal(_bits(ma), _bits(mb))
    sa, sb = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(_bits(sa[k][name]), _bits(sb[k][name])), (k, name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_native_step_is_torchs_path_bit_for_bit(name):
    ours, theirs = _run(CONFIGS[name], True), _run(CONFIGS[name], False)
    assert any(ours[2]) and not any(theirs[2])  # the native kernel ran, then did not
    _assert_same(ours, theirs)


def test_several_threads_split_the_work_and_keep_the_numbers():
    config = CONFIGS["bf16"]  # 256 x 40 weights over 2 threads, pieces of PARALLEL_MIN
    old = native.PARALLEL_MIN
    native.PARALLEL_MIN = 1024
    try:
        two = _run(config, True, width=256, threads=2)
        one = _run(config, True, width=256, threads=1)
    finally:
        native.PARALLEL_MIN = old
    assert all(two[2][i] for i in (0, 1, 3, 4))
    _assert_same(two, one)
    _assert_same(two, _run(config, False, width=256))


@pytest.mark.parametrize("threads", [1, 2])
def test_flush_denormal_reaches_the_native_kernel(threads):
    """Under torch.set_flush_denormal(True), torch's kernel reads subnormal masters as zero;
    so does the native one, in the calling thread and in its worker threads. (torch's kernel
    runs on one thread here: its OpenMP workers keep the mode of the moment they were made,
    so on several its numbers depend on that moment.)"""
    runs, opts = [], []
    for native_on in (True, False):  # built before flushing: the masters stay subnormal
        torch.manual_seed(0)  # every element native (multiples of 64): no torch kernel below
        model = nn.Sequential(nn.Linear(24, 64, bias=False), nn.Linear(64, 4, bias=False))
        for p in model.parameters():
            p.data.mul_(1e-39)
        opt = MixedPrecisionOptimizer(
            # an update of about 1e-36: a subnormal master read as zero shows
            torch.optim.AdamW(model.parameters(), lr=1e-36),
            model=model,
            dtype=torch.bfloat16,
        )
        opt.update.kernel.use_native = native_on
        opts.append((model, opt))
    subnormal = list(opts[0][1].master_values().values())
    assert any(bool(((m != 0) & (m.abs() < torch.finfo().tiny)).any()) for m in subnormal)
    old, before = native.PARALLEL_MIN, torch.get_num_threads()
    native.PARALLEL_MIN = 64
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-denormal mode on this CPU")
    try:
        for (model, opt), n in zip(opts, (threads, 1)):
            torch.set_num_threads(n)
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e-3)
            assert opt.step()
            runs.append([m.clone() for m in opt.master_values().values()])
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
        native.PARALLEL_MIN = old
    plan = opts[0][1].update.kernel._cache[1]
    assert plan.natives and not plan.chunks
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_configuration_where_torchs_kernel_differs_stays_on_torchs_kernel(monkeypatch):
    """A torch build whose kernel rounds differently (simulated: a last-bit change after
    torch's kernel) fails the probe, and the step keeps torch's numbers."""
    real = torch._fused_adamw_

    def other_build(params, *args, **kwargs):
        real(params, *args, **kwargs)
        for p in params:
            p.view(torch.int32).bitwise_xor_(1)

    native_adam._agrees.cache_clear()
    monkeypatch.setattr(torch, "_fused_adamw_", other_build)
    try:
        ours = _run(CONFIGS["bf16"], True)
        theirs = _run(CONFIGS["bf16"], False)
    finally:
        monkeypatch.undo()
        native_adam._agrees.cache_clear()
    assert not any(ours[2])
    _assert_same(ours, theirs)


def test_accumulated_and_clipped_steps_run_torchs_kernel_with_the_same_numbers():
    """Master gradients (accumulation) and a clipped step take torch's kernel; the plan
    switches and the numbers are those of a run that never used the native kernel."""
    runs = []
    for native_on in (True, False):
        model, opt = _bf16_adamw(native_on)
        for i in range(6):
            g = torch.Generator().manual_seed(i)
            for _ in range(1 + (i % 3 == 1)):  # every third step accumulates two
                opt.backward(model(torch.randn(6, 24, generator=g).bfloat16()).float().mean())
            opt.clip = 0.05 if i % 3 == 2 else None
            assert opt.step()
            opt.zero_grad()
        runs.append([m.clone() for m in opt.master_values().values()])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(
    "dtype,flat",
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
    ids=["bf16", "bf16_flat_unaligned", "fp16"],
)
def test_large_tensors_stream_their_half_weights_with_the_same_bits(dtype, flat):
    """A call of at least 2^19 elements streams its half weights (after an unaligned start,
    in a flat buffer); the weights, masters and moments are those of torch's path."""
    runs = []
    for native_on in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Linear(1024, 513, bias=False))
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
            16.0,
            model=model,
            dtype=dtype,
            flat_master=flat,
        )
        opt.update.kernel.use_native = native_on
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=g) * 16).to(p.dtype)
            assert opt.step()
            opt.zero_grad()
        plan = opt.update.kernel._cache[1]
        assert bool(plan.natives) == native_on
        assert not native_on or max(piece.n for piece in plan.natives) >= 1 << 19
        runs.append(
            [_bits(p.detach().clone()) for p in model.parameters()]
            + [_bits(m.clone()) for m in opt.master_values().values()]
            + [_bits(s[k].clone()) for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
        )
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_gradient_laid_out_otherwise_is_planned_again_on_torchs_kernel():
    """A non-contiguous gradient (a transposed copy) after native steps: the cached plan is
    not reused for it, the step runs torch's kernel for that tensor, and the numbers stay."""
    runs = []
    for native_on in (True, False):
        model, opt = _bf16_adamw(native_on)
        natives = []
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            for p in model.parameters():
                grad = torch.randn(p.shape, generator=g).to(p.dtype)
                p.grad = grad.t().contiguous().t() if (i == 1 and p.dim() == 2) else grad
            assert opt.step()
            natives.append(
                len(opt.update.kernel._cache[1].natives) if opt.update.kernel._cache else 0
            )
            opt.zero_grad()
        runs.append(([m.clone() for m in opt.master_values().values()], natives))
    (ours, natives_on), (theirs, _) = runs
    assert natives_on[0] > 0 and natives_on[1] < natives_on[0]
    for a, b in zip(ours, theirs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def _pieces(seed: int) -> tuple[native_adam.NativeSet, list[list[torch.Tensor]]]:
    """Three native pieces of different kinds and param groups, and the tensors they step."""
    gen = torch.Generator().manual_seed(seed)
    pieces, tensors = native_adam.NativeSet(), []
    for k, (kind, n, group) in enumerate(
        (("bf16", 64 * 5, 0), ("f16", 64 * 7, 1), ("split", 64 * 3, 0))
    ):
        dtype = torch.float16 if kind == "f16" else torch.bfloat16
        master = torch.randn(n, generator=gen)
        grad = torch.randn(n, generator=gen).to(dtype)
        m, v = torch.zeros(n), torch.zeros(n)
        step = torch.tensor(float(k + 1))  # the pieces are at different steps
        if kind == "split":
            high, low = master.to(dtype), torch.zeros(n, dtype=torch.int16)
            piece = native_adam.NativePiece(
                group, kind, k, n, high, low, None, m, v, None, step, grad
            )
            tensors.append([high.view(torch.int16), low, m, v])
        else:
            half = master.to(dtype)
            piece = native_adam.NativePiece(
                group, kind, k, n, master, None, half, m, v, None, step, grad
            )
            tensors.append([master, half.view(torch.int16), m, v])
        pieces.add(piece)
    return pieces, tensors


def test_one_call_steps_every_piece_as_its_own_call_would_whatever_the_ranges(monkeypatch):
    groups = [
        {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1},
        {"lr": 3e-3, "betas": (0.8, 0.999), "eps": 1e-6, "weight_decay": 0.0},
    ]
    for g in groups:
        g.update(amsgrad=False, maximize=False)
    flags = [native_adam.GroupFlags(True, True, False, False)] * 2
    together, stepped = _pieces(0)
    together.step(groups, flags, 2.0, False)
    pieces, alone = _pieces(0)
    for piece in pieces:
        one = native_adam.NativeSet()
        one.add(piece)
        one.step(groups, flags, 2.0, False)
    monkeypatch.setattr(native, "PARALLEL_MIN", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # three ranges that cut across the pieces
    try:
        threaded, split_up = _pieces(0)
        threaded.step(groups, flags, 2.0, False)
    finally:
        torch.set_num_threads(before)
    untouched = _pieces(0)[1]
    for ours, one, three, old in zip(stepped, alone, split_up, untouched):
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ours, one, three))
        assert not torch.equal(ours[0], old[0]) and not torch.equal(ours[2], old[2])


def test_a_half_models_fp32_norm_layers_step_in_the_same_native_call():
    """LayerNorm weights a half model keeps in fp32 (a multiple of 64 elements) join the one
    native call: no torch kernel runs, and the numbers are torch's path's."""
    results = []
    for native_on in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), nn.Linear(64, 64))
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
        )
        opt.update.kernel.use_native = native_on
        for i in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
            opt.backward(model(x.to(torch.bfloat16)).float().square().mean())
            with OpRecorder() as rec:
                assert opt.step()
            opt.zero_grad()
        plan = opt.update.kernel._cache[1]
        if native_on:
            assert {p.kind for p in plan.natives} == {"bf16", "f32"} and not plan.chunks
            assert rec.count("_fused_adamw_") == 0
        results.append([p.detach().clone() for p in model.parameters()])
    assert model[1].weight.dtype == torch.float32
    for a, b in zip(*results):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("kind", ["bf16", "f16", "split", "f32"])
def test_the_step_tables_check_finds_a_bad_gradient_in_any_piece(kind):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "split": torch.bfloat16}.get(
        kind, torch.float32
    )
    n = 64 * 3

    def piece(item: int) -> native_adam.NativePiece:
        z = torch.zeros(n)
        low = torch.zeros(n, dtype=torch.int16) if kind == "split" else None
        half = None if kind == "f32" else torch.zeros(n, dtype=torch.bfloat16)
        return native_adam.NativePiece(0, kind, item, n, z, low, half, z.clone(), z.clone(),
                                       None, torch.zeros(()))  # fmt: skip

    pieces = native_adam.NativeSet()
    for item in range(3):
        pieces.add(piece(item))
    grads = [torch.ones(n + 5, dtype=dtype) for _ in range(3)]  # the tail past n: not read
    assert pieces.set_grads(grads) and not pieces.any_nonfinite()
    grads[1][n] = float("nan")
    assert not pieces.any_nonfinite()
    for item, at in ((0, 0), (1, n - 1), (2, 77)):
        grads[item][at] = float("inf")
        assert pieces.any_nonfinite(), (item, at)
        grads[item][at] = 1.0
    assert not pieces.set_grads([grads[0], grads[1][:-6], grads[2]])  # too short: refused
    assert pieces.pieces[1].grad is not None and pieces.pieces[1].grad.numel() == n


def test_an_autocast_optimizers_fp32_parameters_step_natively_in_place_bit_for_bit():
    runs = []
    for native_on in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 128), nn.LayerNorm(128), nn.Linear(128, 64))
        opt = AutocastOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), dtype=torch.bfloat16
        )
        opt.update.kernel.use_native = native_on
        taken = []
        for i in range(4):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
            with opt.autocast():
                loss = model(x).float().square().mean()
            opt.backward(loss * (float("inf") if i == 2 else 1.0))
            taken.append(opt.step())
            opt.zero_grad()
        natives = opt.update.kernel._cache[1].natives
        if native_on:  # the parameters are their own masters: no weight to copy into
            assert {p.kind for p in natives} == {"f32"} and all(p.half is None for p in natives)
        runs.append((taken, [p.detach().clone() for p in model.parameters()]))
    (taken_a, a), (taken_b, b) = runs
    assert taken_a == taken_b == [True, True, False, True]
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
