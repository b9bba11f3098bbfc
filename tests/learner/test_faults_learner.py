"""Fault injection into the Learner, hypothesis-driven: a user callback raising at any event
of a batch (before or after MixedPrecision runs), KeyboardInterrupt mid-epoch from the
data, the loss function or a callback, inf/nan gradients and a disk that fills up during a
checkpoint save. A stopped fit must leave the
model equal to its rounded masters and the step count right, and fitting on must give bit
for bit what a learner that took the same steps without stopping gives; a skipped step
must change nothing (see mixprec.cli.bench.fault_learner)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixprec.cli.bench.fault_learner import (
    BATCH_EVENTS,
    IN_STEP,
    N_BATCHES,
    TRAIN_END,
    WHERE,
    LearnerConfig,
    Stop,
    run_disk_full,
    run_grad_faults,
    run_reentrant_validate,
    run_replaced_module,
    run_stop,
)

CONFIGS = (
    LearnerConfig("per-tensor"),
    LearnerConfig("flat", flat_master=True),
    LearnerConfig("fused dynamic", fused=True, loss_scale="dynamic"),
)
STOPS_PER_CONFIG = 24  # 3 x 24 = 72 stops, the same ones every run
GRAD_RUNS = 6  # per static config: 2 x 6 x 3 faults = 36
deterministic = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

stops = st.builds(
    Stop,
    step=st.integers(0, N_BATCHES - 1),
    where=st.sampled_from(WHERE),
    error=st.sampled_from((RuntimeError, KeyboardInterrupt)),
    late=st.booleans(),
)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_a_stopped_fit_leaves_a_consistent_learner_that_fits_on_exactly(config):
    seen = []

    @settings(deterministic, max_examples=STOPS_PER_CONFIG)
    @given(stop=stops)
    def check(stop):
        result = run_stop(config, stop)
        assert result.problems == [] and result.lost == 0, result
        seen.append(stop)

    check()
    assert len(seen) == STOPS_PER_CONFIG
    assert {s.error for s in seen} == {RuntimeError, KeyboardInterrupt}


def test_every_event_source_and_error_is_covered_once():
    # hypothesis samples; this sweeps every source once, with a callback after
    # MixedPrecision too (on_backward_end then comes after the gradients were unscaled)
    config = CONFIGS[0]
    for where in WHERE:
        for late in (False, True) if where in BATCH_EVENTS else (False,):
            for error in (RuntimeError, KeyboardInterrupt):
                result = run_stop(config, Stop(1, where, error, late))
                assert result.ok, result


@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: c.name)
def test_inf_nan_gradients_skip_their_steps_and_nothing_else(config):
    runs = []

    @settings(deterministic, max_examples=GRAD_RUNS)
    @given(
        faults=st.dictionaries(
            st.integers(0, 7),
            st.tuples(
                st.integers(0, 5),
                st.integers(0, 1 << 12),
                st.sampled_from((math.inf, -math.inf, math.nan)),
            ),
            min_size=3,
            max_size=3,
        )
    )
    def check(faults):
        result = run_grad_faults(config, faults)
        assert result.ok, result  # skipped == faulted, equal to the run without them
        runs.append(result.faults)

    check()
    assert runs == [3] * GRAD_RUNS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "stop",
    [Stop(1, IN_STEP, KeyboardInterrupt), Stop(0, TRAIN_END, KeyboardInterrupt)],
    ids=["SIGINT inside the step", "KeyboardInterrupt in on_train_end"],
)
def test_sigint_inside_the_step_and_a_stop_at_train_end_leave_nothing_half_done(config, stop):
    result = run_stop(config, stop)
    assert result.ok, result.problems


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_a_full_disk_at_a_save_keeps_the_previous_checkpoint_to_resume_from_exactly(config):
    result = run_disk_full(config, at=1)
    assert result.ok, result.problems


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("event", ["on_batch_begin", "on_loss_begin", "on_step_end"])
def test_validate_from_a_callback_mid_fit_changes_no_number(config, event):
    result = run_reentrant_validate(config, event, [0, 3, 6])
    assert result.ok and result.faults == 3, result


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_a_module_replaced_between_fits_trains_as_one_given_its_values(config):
    result = run_replaced_module(config, seed=3)
    assert result.ok, result
