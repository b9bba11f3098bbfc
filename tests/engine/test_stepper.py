import copy
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from helpers.tensors import tensors_in
from mixprec import MixedPrecisionOptimizer, Stepper, model_to_half

BATCH, NOISE = 16, 4


def _mlp(n_in):
    return nn.Sequential(nn.Linear(n_in, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def _gan(flat=False, seed=0):
    torch.manual_seed(seed)
    generator, discriminator = model_to_half(_mlp(NOISE)), model_to_half(_mlp(1))

    def stepper(model):
        opt = MixedPrecisionOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            "dynamic",
            init_scale=2.0**10,
            flat_master=flat,
        )
        return Stepper(opt, StepLR(opt, step_size=1, gamma=0.5))

    return generator, discriminator, stepper(generator), stepper(discriminator)


def _d_loss(discriminator, real, fake):
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(fake), 1)
    loss = F.binary_cross_entropy_with_logits(discriminator(real.half()).float(), ones)
    return loss + F.binary_cross_entropy_with_logits(discriminator(fake.detach()).float(), zeros)


def _g_loss(discriminator, fake):
    return F.binary_cross_entropy_with_logits(discriminator(fake).float(), torch.ones(len(fake), 1))


def _state(model, stepper):
    """Copies of the model weights, the fp32 masters and the optimizer state."""
    return [t.clone() for t in tensors_in([model.state_dict(), stepper.optimizer.state_dict()])]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("flat", [False, True])
def test_an_overflow_in_the_discriminator_skips_only_the_discriminator(flat):
    generator, discriminator, g, d = _gan(flat)
    data = torch.Generator().manual_seed(1)
    k, steps = 3, 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(steps):
            real = torch.randn(BATCH, 1, generator=data) + 3.0
            fake = generator(torch.randn(BATCH, NOISE, generator=data).half())
            d_loss = _d_loss(discriminator, real, fake)
            if step == k:
                d_loss = d_loss * math.inf
                d_before, g_before = _state(discriminator, d), _state(generator, g)
                scales = d.optimizer.loss_scale, g.optimizer.loss_scale
                lrs = d.optimizer.param_groups[0]["lr"], g.optimizer.param_groups[0]["lr"]
            d_applied = d.step(d_loss)
            g_applied = g.step(_g_loss(discriminator, fake))
            assert g_applied and d_applied == (step != k) and d.applied == d_applied
            if step == k:
                assert _equal(_state(discriminator, d), d_before)  # bit-identical
                assert not _equal(_state(generator, g), g_before)
                assert d.optimizer.loss_scale == scales[0] / 2  # backed off
                assert g.optimizer.loss_scale == scales[1]
                assert d.optimizer.param_groups[0]["lr"] == lrs[0]  # schedule stayed put
                assert g.optimizer.param_groups[0]["lr"] == lrs[1] / 2
    assert (d.steps, d.skipped_steps, d.optimizer.skipped_steps) == (steps, 1, 1)
    assert (g.steps, g.skipped_steps, g.optimizer.skipped_steps) == (steps, 0, 0)
    assert d.scheduler.last_epoch == steps - 1 and g.scheduler.last_epoch == steps
    assert all(p.isfinite().all() for p in [*generator.parameters(), *discriminator.parameters()])


@pytest.mark.parametrize("flat", [False, True])
def test_gradients_left_by_another_loss_do_not_leak_into_a_step(flat):
    # The generator's backward runs through the discriminator and leaves gradients in its
    # parameters (scaled by the generator's scale); the discriminator's step must ignore them.
    real, noise = torch.randn(BATCH, 1) + 3.0, torch.randn(BATCH, NOISE).half()
    fake_input = torch.randn(BATCH, 1).half()
    results = []
    for generator_first in (True, False):
        generator, discriminator, g, d = _gan(flat)
        if generator_first:
            g.step(_g_loss(discriminator, generator(noise)))
            assert any(p.grad is not None and p.grad.any() for p in discriminator.parameters())
        d.step(_d_loss(discriminator, real, fake_input))
        results.append(_state(discriminator, d))
    assert _equal(*results)


def test_a_plain_optimizer_always_applies():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(opt, StepLR(opt, step_size=1, gamma=0.5))
    weight = model.weight.detach().clone()
    assert stepper.step(model(torch.randn(4, 2)).pow(2).mean()) is True
    assert not torch.equal(model.weight, weight) and opt.param_groups[0]["lr"] == 0.05


def test_state_dict_round_trip():
    _, discriminator, _, d = _gan()
    fake = torch.randn(BATCH, 1).half()
    d.step(_d_loss(discriminator, torch.randn(BATCH, 1), fake) * math.inf)
    d.step(_d_loss(discriminator, torch.randn(BATCH, 1), fake))
    saved = copy.deepcopy(d.state_dict())
    _, discriminator2, _, d2 = _gan(seed=1)
    d2.load_state_dict(saved)
    assert (d2.steps, d2.skipped_steps) == (2, 1)
    assert d2.optimizer.loss_scale == d.optimizer.loss_scale == 2.0**9
    assert d2.scheduler.last_epoch == 1 and d2.optimizer.param_groups[0]["lr"] == 5e-3
    assert _equal(_state(discriminator2, d2), _state(discriminator, d))
    d2.load_state_dict({**saved, "added_by_a_newer_version": 1})
    with pytest.raises(ValueError, match="disagree on having a scheduler"):
        Stepper(d2.optimizer).load_state_dict(saved)
    with pytest.raises(ValueError, match="expected a Stepper state_dict"):
        d2.load_state_dict({"steps": 3})


def test_bad_arguments_are_refused():
    _, _, g, d = _gan()
    with pytest.raises(TypeError, match="optimizer must be a MixedPrecisionOptimizer"):
        Stepper(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"the scheduler \(StepLR\) schedules another optimizer"):
        Stepper(d.optimizer, g.scheduler)
    with pytest.raises(TypeError, match=r"per-step torch LRScheduler .* got ReduceLROnPlateau"):
        Stepper(d.optimizer, ReduceLROnPlateau(d.optimizer))
    # a scheduler built on the wrapped optimizer is the same schedule
    Stepper(d.optimizer, StepLR(d.optimizer.optimizer, step_size=1))


def test_the_gan_example_runs(capsys, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "examples" / "gan.py"
    spec = importlib.util.spec_from_file_location("gan_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gan_example", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    assert module.main(["--steps", "12", "--inject-inf-at", "5"]) == 0
    out = capsys.readouterr().out
    assert "step 5: inf injected: discriminator applied=False, generator applied=True" in out
    assert "discriminator: 1 skipped" in out and "generator:     0 skipped" in out
