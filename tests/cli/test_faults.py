"""Fault injection into the engine, hypothesis-driven: inf/nan in half gradients at random
steps, parameters and elements, inf/nan losses and inputs, under every engine configuration
(per-tensor and flat masters, the fused step, clipping, static and dynamic scaling,
accumulation). After every step the run must equal, bit for bit, a fault-free reference in
which each faulted step is only a scaler update (see mixprec.cli.bench.fault_injection)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec.cli.bench.fault_injection import CONFIGS, PARAM_NAMES, Fault, run_faults

STEPS = 8
FAULTS_PER_RUN = 3
EXAMPLES = 25  # per configuration: 7 x 25 x 3 = 525 faults, the same ones every run
VALUES = (math.inf, -math.inf, math.nan)

faults = st.lists(
    st.builds(
        Fault,
        step=st.integers(0, STEPS - 1),
        kind=st.sampled_from(("grad", "grad", "loss", "input")),  # gradients twice as often
        param=st.integers(0, len(PARAM_NAMES) - 1),
        index=st.integers(0, 1 << 12),
        value=st.sampled_from(VALUES),
    ),
    min_size=FAULTS_PER_RUN,
    max_size=FAULTS_PER_RUN,
)
deterministic = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same schedules every run, so the fault count is fixed
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_faulted_step_is_a_no_op_and_no_update_is_lost(config):
    injected = []

    @deterministic
    @given(schedule=faults)
    def check(schedule):
        result = run_faults(config, schedule, STEPS)
        assert result.mismatches == [], result  # masters, model, optimizer, scaler
        assert result.misnamed == [], result  # the overflow report names the hit params
        assert result.skipped == result.faulted_steps == len({f.step for f in schedule})
        assert result.lost == 0
        injected.append(result.faults)

    check()
    assert injected == [FAULTS_PER_RUN] * EXAMPLES


def test_the_reference_check_catches_a_skipped_step_that_moved_the_masters(monkeypatch):
    # the oracle can fail: a "skip" that still steps the wrapped optimizer is caught
    from mixprec.engine.optimizer import MixedPrecisionOptimizer

    step = MixedPrecisionOptimizer.step

    def leaky_step(self, closure=None):
        applied = step(self)
        if not applied:
            self.optimizer.step()
        return applied

    monkeypatch.setattr(MixedPrecisionOptimizer, "step", leaky_step)
    result = run_faults(CONFIGS[0], [Fault(2, "grad", value=math.inf)], 4)
    assert "step 2: masters" in result.mismatches and not result.ok


def test_a_run_without_faults_matches_its_reference_and_skips_nothing():
    for config in CONFIGS:
        result = run_faults(config, [], 4)
        assert result.ok and result.skipped == 0 and result.faults == 0


def test_a_norm_that_overflows_fp32_is_skipped_and_said_as_such():
    (config,) = [c for c in CONFIGS if "norm" in c.kinds]
    result = run_faults(config, [Fault(2, "norm", param=4, value=1e25)], 5)
    assert result.ok and result.skipped == 1, result  # finite gradients, an inf norm: skipped
