"""Overflow on one rank only: two real gloo processes (one launch), DDP, every engine
configuration; each rank checks itself against its fault-free reference at every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.faults_worker import FAULTS_PER_RUN, STEPS
from helpers.launch import launch
from mixprec.cli.bench.fault_injection import CONFIGS

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORKER = Path(__file__).parents[1] / "helpers" / "faults_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(WORKER, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_a_fault_on_one_rank_skips_the_step_on_every_rank_as_a_no_op(ranks, config):
    rank0, rank1 = (r[config] for r in ranks)
    assert rank0["faults"] == FAULTS_PER_RUN and rank0["steps"] == STEPS
    assert rank0["one_rank_faults"] > 0  # the schedule does hit single ranks
    for rank in (rank0, rank1):
        assert rank["mismatches"] == [] and rank["misnamed"] == []
        assert rank["skipped"] == rank["faulted_steps"] > 0
        assert rank["lost"] == 0
    assert torch.equal(rank0["masters"], rank1["masters"])  # the ranks never drift apart


def test_the_launch_injected_enough_faults(ranks):
    assert sum(r["faults"] for r in ranks[0].values()) == len(CONFIGS) * FAULTS_PER_RUN
