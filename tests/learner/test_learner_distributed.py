"""The Learner on 2 real processes (gloo on CPU), started as torchrun starts them: identical
weights on every rank, sharded and reshuffled data, reduced validation, one overflow
decision, checkpoints written by rank 0 and resumed on both; and `mixprec train` under
torchrun's environment.

One launch of learner_distributed_worker.py runs every scenario (gradient accumulation too);
each test checks one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.accumulate_worker import make, weights
from helpers.launch import free_port, run_ranks
from helpers.learner import assert_identical
from helpers.learner_distributed_worker import (
    BATCH,
    DYNAMIC,
    INIT_SEED,
    N_TRAIN,
    POISONED_STEP,
    data,
    masters,
    net,
    tensors,
)
from mixprec import Learner, accuracy

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORKER = Path(__file__).parents[1] / "helpers" / "learner_distributed_worker.py"
STEPS_PER_EPOCH = N_TRAIN // (2 * BATCH)  # each of the 2 ranks: half of each epoch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's results, from one launch of 2 worker processes."""
    out = tmp_path_factory.mktemp("learner_distributed")
    run_ranks([str(WORKER), str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _one_process(*, half: bool) -> Learner:
    """Rank 0's learner, alone in this process."""
    learn = Learner(data(), net(INIT_SEED), metrics=[accuracy], progress=False, distributed=False)
    return learn.to_fp16(**DYNAMIC) if half else learn


def test_every_rank_trains_rank_0s_weights_and_ends_bit_identical(ranks) -> None:
    r0, r1 = (r["identical"] for r in ranks)
    # the Learner starts every rank from rank 0's fp32 weights (rank 1 built others) ...
    expected = [p.detach() for p in net(INIT_SEED).parameters()]
    assert_identical(r0["init"], expected)
    assert_identical(r1["init"], expected)
    # ... and fit() starts from rank 0's exact fp32 masters, though rank 1 changed its
    # weights again before to_fp16(): not from the rounded half copy, not from rank 1's own
    first = masters(_one_process(half=True))
    assert torch.equal(r0["first_masters"], first) and torch.equal(r1["first_masters"], first)
    # after 2 epochs (8 steps): model with BatchNorm statistics, masters, AdamW, scaler
    assert_identical(r0["state"], r1["state"], "fp16")
    assert_identical(r0["fp32"], r1["fp32"], "fp32")
    assert_identical(r0["autocast"], r1["autocast"], "autocast")  # fp32 model, autocast
    assert not torch.equal(r0["state"]["masters"][0], r0["init"][0])  # it trained
    # the recorded loss is the mean over ranks: the same history on both
    assert_identical(r0["recorder"], r1["recorder"])
    assert len(r0["recorder"]["losses"]) == 2 * STEPS_PER_EPOCH


def test_each_rank_trains_its_own_share_of_each_epoch_reshuffled(ranks) -> None:
    x, _ = tensors()
    train = x[:N_TRAIN].half().float()  # as the inputs reached the half model

    def indices(rows: list[torch.Tensor]) -> list[int]:
        rows = torch.cat(rows)
        match = (rows[:, None, :] == train[None, :, :]).all(dim=-1)
        assert (match.sum(dim=1) == 1).all()
        return match.float().argmax(dim=1).tolist()

    assert {r["identical"]["sampler"] for r in ranks} == {"DistributedSampler"}
    epochs = []
    for epoch in range(2):
        seen = [
            indices(
                r["identical"]["inputs"][epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]
            )
            for r in ranks
        ]
        assert [len(s) for s in seen] == [N_TRAIN // 2] * 2
        assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))  # disjoint, all of them
        epochs.append(seen)
    assert epochs[0][0] != epochs[1][0]  # set_epoch: another order in epoch 2
    assert sorted(epochs[0][0]) != sorted(epochs[1][0])  # and another share


def test_validation_sums_are_reduced_over_uneven_shards(ranks) -> None:
    r0, r1 = (r["identical"] for r in ranks)
    assert r0["valid_before"] == r1["valid_before"] and r0["valid"] == r1["valid"]
    # one process over the whole validation set (33 samples: 17 + 16 on the ranks)
    assert _one_process(half=False).validate() == pytest.approx(r0["valid_before"], abs=1e-6)
    learn = _one_process(half=True)
    learn.model.load_state_dict(r0["state"]["model"])
    assert learn.validate() == pytest.approx(r0["valid"], abs=1e-6)


def test_an_inf_on_rank_1_only_makes_both_ranks_skip_the_step(ranks) -> None:
    r0, r1 = (r["skip"] for r in ranks)
    skipped = [step == POISONED_STEP for step in range(STEPS_PER_EPOCH)]
    assert r0["skipped"] == r1["skipped"] == skipped  # rank 0 saw no inf itself
    assert r0["scales"] == r1["scales"]
    assert r0["scales"][POISONED_STEP] == r0["scales"][POISONED_STEP - 1] / 2
    for r in (r0, r1):
        before, after = r["around"]
        assert torch.equal(before, after)  # the skipped step left the masters alone
    assert_identical(r0["state"], r1["state"])


def test_rank_0_saves_and_both_ranks_resume_as_if_never_stopped(ranks) -> None:
    for rank, r in enumerate(r["resume"] for r in ranks):
        assert r["files"] == ["epoch1.pth"]  # one file, no temporary left over
        assert r["rng_ranks"] == 2  # every rank's random state, in rank 0's file
        assert torch.equal(r["rng_after_load"], r["rng_at_save"]), f"rank {rank}"
        assert_identical(r["resumed"], r["straight"], f"rank {rank}")
    # the ranks' random states differ (Dropout draws per rank): each got its own back
    assert not torch.equal(ranks[0]["resume"]["rng_at_save"], ranks[1]["resume"]["rng_at_save"])
    assert_identical(ranks[0]["resume"]["resumed"], ranks[1]["resume"]["resumed"])


def test_mixprec_train_under_torchrun_prints_once_on_rank_0() -> None:
    args = ["-m", "mixprec", "train", "--epochs", "1", "--precisions", "bf16", "--json"]
    (out0, _), (out1, _) = run_ranks(args)
    result = json.loads(out0)
    assert result["processes"] == 2
    (run,) = result["runs"]
    assert run["precision"] == "bf16" and 0.5 < run["accuracy"] <= 1.0
    assert out1 == ""


# -- gradient accumulation: 2 micro-batches of 4 per rank against one batch of 8 per rank ------
ACCUMULATION_TOLERANCE = {"fp32": 1e-6, "fp16": 1e-4, "bf16": 1e-3}  # as in test_accumulate.py


@pytest.mark.parametrize("name", ACCUMULATION_TOLERANCE)
def test_accumulating_two_micro_batches_per_rank_train_as_one_batch_twice_as_large(ranks, name):
    r0, r1 = ranks[0]["accumulate"][name], ranks[1]["accumulate"][name]
    assert torch.equal(r0["accumulated"], r1["accumulated"])  # every rank steps the same
    diff = (r0["accumulated"] - r0["large"]).abs().max().item()
    assert diff < ACCUMULATION_TOLERANCE[name]
    assert not torch.equal(r0["large"], weights(make(8, 1, None)))  # it trained


def test_accumulating_ddp_reduces_only_in_the_steps_last_backward(ranks):
    g0, g1 = ranks[0]["accumulate"]["grads"], ranks[1]["accumulate"]["grads"]
    assert (
        ranks[0]["accumulate"]["steps"] == 4 and len(g0) == 8
    )  # per step: after micro-batch 1, at the step
    for k in range(0, 8, 2):
        assert not torch.allclose(g0[k], g1[k])  # the first micro-batch's: this rank's own
        assert torch.equal(g0[k + 1], g1[k + 1])  # reduced over both ranks at the last backward


# -- processes that cannot train together: a clear error on every rank, never a hang -----------
UNEVEN = Path(__file__).parents[1] / "helpers" / "uneven_shards_worker.py"


def test_uneven_iterable_shards_are_an_error_on_both_ranks_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXPREC_COLLECTIVE_TIMEOUT", "5")
    (out0, _), (out1, _) = run_ranks([str(UNEVEN), str(tmp_path)], timeout=120)
    for rank, out in enumerate((out0, out1)):
        assert f"rank {rank} of 2: the ranks' training loaders give different numbers" in out
        assert "rank(s) [1] have batch 4, rank(s) [0] have 3" in out


def test_even_iterable_shards_train(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXPREC_COLLECTIVE_TIMEOUT", "5")
    (out0, _), (out1, _) = run_ranks([str(UNEVEN), str(tmp_path), "even"], timeout=120)
    assert out0.strip() == out1.strip() == "trained 6"


def test_a_learner_in_world_size_2_with_one_process_fails_within_the_timeout(tmp_path):
    script = (
        "from helpers.learner import make_learner\n"
        "from mixprec.parallel.distributed import CollectiveTimeout\n"
        "try:\n"
        "    make_learner('.')\n"
        "except (CollectiveTimeout, ValueError) as error:\n"
        "    print(error)\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).resolve().parents[1])]),
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "MIXPREC_INIT_TIMEOUT": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "rank 0 of 2: joining the process group" in done.stdout, done.stderr
    assert "Start all 2 processes" in done.stdout
    del env["MASTER_ADDR"]  # not started by torchrun: the message says so
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "WORLD_SIZE=2 and RANK=0 say this is one of 2 processes" in done.stdout, done.stderr
    assert "Launch with torchrun" in done.stdout
