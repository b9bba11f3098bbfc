"""Gradient accumulation on 2 real processes (gloo on CPU): DDP reduces once per step (no_sync
for the first micro-batch), and 2 micro-batches of 4 per rank train as one batch of 8 per rank
within rounding, in fp32, fp16 and bf16. One launch runs every case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.accumulate_worker import make, weights
from helpers.launch import launch

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORKER = Path(__file__).parents[1] / "helpers" / "accumulate_worker.py"
TOLERANCE = {"fp32": 1e-6, "fp16": 1e-4, "bf16": 1e-3}  # as in test_accumulate.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(WORKER, tmp_path_factory.mktemp("accumulate"))


@pytest.mark.parametrize("name", TOLERANCE)
def test_two_micro_batches_per_rank_train_as_one_batch_twice_as_large(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert torch.equal(r0["accumulated"], r1["accumulated"])  # every rank steps the same
    diff = (r0["accumulated"] - r0["large"]).abs().max().item()
    assert diff < TOLERANCE[name]
    assert not torch.equal(r0["large"], weights(make(8, 1, None)))  # it trained


def test_ddp_reduces_only_in_the_steps_last_backward(ranks):
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    assert ranks[0]["steps"] == 4 and len(g0) == 8  # per step: after micro-batch 1, at the step
    for k in range(0, 8, 2):
        assert not torch.allclose(g0[k], g1[k])  # the first micro-batch's: this rank's own
        assert torch.equal(g0[k + 1], g1[k + 1])  # reduced over both ranks at the last backward
