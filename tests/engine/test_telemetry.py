"""Telemetry: per-step records on the device, read back every N steps; Recorder and CSVLogger."""

import contextlib
import csv
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers.learner import make_learner
from mixprec import (
    AutocastOptimizer,
    CSVLogger,
    MixedPrecisionOptimizer,
    Recorder,
    Telemetry,
    model_to_half,
)
from mixprec.engine.telemetry import NO_TELEMETRY, TelemetryRow, grad_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INF_STEP, N_INF = 1, 3  # step 1 gets 3 inf gradient values

ENGINES = {
    "master": {},
    "master flat": {"flat_master": True},
    "master fused": {"fused": True},
    "master flat fused": {"flat_master": True, "fused": True},
    "master flat clip": {"flat_master": True, "clip": 0.05},
    "master fused clip": {"fused": True, "clip": 0.05},
    "autocast": {"mode": "autocast"},
    "autocast clip": {"mode": "autocast", "clip": 0.05},
}


def make_engine(options):
    options = dict(options)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if options.pop("mode", "master") == "autocast":
        opt = AutocastOptimizer(torch.optim.AdamW(model.parameters()), "dynamic", **options)
        return model, opt, opt.autocast, torch.float32
    model = model_to_half(model)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "dynamic", **options)
    return model, opt, contextlib.nullcontext, torch.float16


def train(model, opt, region, dtype, steps):
    """Steps on fixed batches, an inf at INF_STEP; per step the unscaled grad norm of the model
    grads (the reference) and the scale used."""
    expected = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)
        with region():
            loss = F.cross_entropy(model(x).float(), y)
        scale = opt.loss_scale
        opt.backward(loss)
        if step == INF_STEP:
            model[0].weight.grad.view(-1)[:N_INF] = float("inf")
        grads = [p.grad.float() for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) / scale
        expected.append((scale, step == INF_STEP, norm.item(), N_INF if step == INF_STEP else 0))
        opt.step()
        opt.zero_grad()
    return expected


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_hold_each_steps_scale_overflow_norm_and_nonfinite_count(engine):
    model, opt, region, dtype = make_engine(ENGINES[engine])
    assert opt.telemetry is NO_TELEMETRY
    telemetry = Telemetry(every=2).attach(opt)
    expected = train(model, opt, region, dtype, steps=5)
    assert len(telemetry.rows) == 4 and telemetry.steps == 5  # read back at steps 2 and 4
    telemetry.flush()
    assert [r.step for r in telemetry.rows] == list(range(5))
    for row, (scale, overflow, norm, nonfinite) in zip(telemetry.rows, expected):
        assert (row.loss_scale, row.overflow, row.nonfinite) == (scale, overflow, nonfinite)
        if overflow:
            assert not math.isfinite(row.grad_norm)
        else:  # the unscaled norm, before clipping
            assert row.grad_norm == pytest.approx(norm, rel=1e-5)
    assert telemetry.rows[INF_STEP + 1].loss_scale == telemetry.rows[INF_STEP].loss_scale / 2


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_syncs():
    """Count the Tensor methods that copy a value to the host (every host sync on a GPU)."""
    counts = dict.fromkeys(SYNCS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return method

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def syncs_over_ten_steps(options, every):
    """The host syncs of 10 training steps, with telemetry read back every `every` (None: off)."""
    model, opt, region, dtype = make_engine(options)
    if every is not None:
        Telemetry(every=every).attach(opt)
    batches = [(torch.randn(16, 8).to(dtype), torch.randint(0, 4, (16,))) for _ in range(10)]
    with count_syncs() as counts:
        for x, y in batches:
            with region():
                loss = F.cross_entropy(model(x).float(), y)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
    return counts


@pytest.mark.parametrize("engine", ["master flat fused", "master", "autocast clip"])
def test_telemetry_adds_no_host_sync_per_step_only_one_per_read_back(engine):
    off = syncs_over_ten_steps(ENGINES[engine], None)
    on = syncs_over_ten_steps(ENGINES[engine], 4)
    assert off["item"] >= 10  # the overflow flag, once per step (and AdamW's CPU step counts)
    assert on == {**off, "tolist": off["tolist"] + 2}  # read back at steps 4 and 8, nothing else


def test_the_off_object_does_nothing_and_bad_use_is_refused():
    assert NO_TELEMETRY.record_(torch.zeros(1), 1.0, lambda: 1 / 0) is None  # grads never read
    assert NO_TELEMETRY.flush() == [] and not NO_TELEMETRY.enabled
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        Telemetry(every=0)
    with pytest.raises(TypeError, match="records the steps of a MixedPrecisionOptimizer"):
        Telemetry().attach(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


def test_grad_stats_counts_nonfinite_values_and_takes_half_norms_in_fp32():
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # its norm overflows fp16
    bad = torch.tensor([1.0, float("nan"), float("-inf"), 2.0])
    norm, count = grad_stats([big, torch.ones(3)], grad_scale=2.0)
    assert norm.item() == pytest.approx(math.sqrt(4 * 60000.0**2 + 3) / 2.0)
    assert count.item() == 0
    assert grad_stats([bad, big])[1].item() == 2


def test_state_dict_round_trip():
    telemetry = Telemetry(every=3)
    telemetry.rows = [TelemetryRow(0, 512.0, False, 1.5, 0)]
    telemetry.steps = 1
    copy_ = Telemetry(every=3)
    copy_.load_state_dict({**telemetry.state_dict(), "from_a_newer_version": 1})
    assert copy_.rows == telemetry.rows and copy_.steps == 1


def test_the_recorder_keeps_and_plots_it_and_csv_logger_writes_it(tmp_path):
    learn = make_learner(tmp_path).to_fp16("dynamic", init_scale=2.0**20, telemetry=3)
    learn.add_cb(CSVLogger("logs/telemetry.csv"))
    learn.fit(1, lr=1e-2)
    learn.fit(1, lr=1e-2)
    rec, n = learn.recorder, len(learn.data.train_dl)
    assert rec.telemetry_steps == list(range(1, 2 * n + 1))
    assert [c > 0 for c in rec.nonfinite] == rec.skipped and any(rec.skipped)
    assert [math.isfinite(g) for g in rec.grad_norms] == [not s for s in rec.skipped]
    with open(tmp_path / "logs" / "telemetry.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == rec.telemetry_steps  # header once, both fits
    assert [float(r["loss_scale"]) for r in rows][1] == 2.0**19  # backed off after step 1
    assert [r["overflow"] == "1" for r in rows] == rec.skipped
    assert [int(r["nonfinite"]) for r in rows] == rec.nonfinite
    copy_ = Recorder()
    copy_.load_state_dict(rec.state_dict())
    assert copy_.grad_norms == rec.grad_norms and copy_.nonfinite == rec.nonfinite
    path = rec.plot(tmp_path / "telemetry.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_csv_logger_needs_telemetry(tmp_path):
    learn = make_learner(tmp_path).to_fp16()
    learn.add_cb(CSVLogger())
    with pytest.raises(ValueError, match="telemetry, which is off: train with"):
        learn.fit(1)
