"""Two real processes on gloo (CPU), started as torchrun would start them: DDP with
MixedPrecisionOptimizer, and FSDP2 with mixprec's policy and scaler.

One launch runs every scenario of distributed_worker.py; each test checks one of them
against the other rank, or against a single process computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.distributed_worker import (
    DistEnv,
    make_net,
    masters,
    model_to_half,
    sgd_run,
    train,
)
from helpers.launch import WORLD_SIZE, launch

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORKER = Path(__file__).parents[1] / "helpers" / "distributed_worker.py"
# The 2-rank runs differ from one process by the order of fp16 sums (about 6e-4 here, with
# weights moving by 0.5-0.8); a rank that missed the other's gradients is off by 0.5 or more.
FP16_ROUNDING = 5e-3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's results, from one launch of 2 worker processes."""
    return launch(WORKER, tmp_path_factory.mktemp("distributed"), WORLD_SIZE)


def single_process(steps: int, *, world_size: int = 1, **options: Any) -> torch.Tensor:
    """Masters after `steps` of the SGD run in this process (world_size=2: rank 0's half only)."""
    model = model_to_half(make_net())
    opt = sgd_run(model, **options)
    train(model, opt, range(steps), env=DistEnv(world_size=world_size))
    return masters(opt)


@pytest.mark.parametrize("bucket_view", [False, True])
@pytest.mark.parametrize("flat", [False, True])
def test_every_rank_holds_identical_masters_and_model(
    ranks: list, flat: bool, bucket_view: bool
) -> None:
    rank0, rank1 = (r["identical"][f"flat={flat},bucket_view={bucket_view}"] for r in ranks)
    assert rank0["log"] == rank1["log"]
    assert [applied for applied, _ in rank0["log"]] == [True] * 6
    assert rank0["log"][-1][1] > rank0["log"][0][1]  # the scale grew: the step count agreed
    assert torch.equal(rank0["masters"], rank1["masters"])
    assert torch.equal(rank0["model"], rank1["model"])


@pytest.mark.parametrize("half", ["torch.float16", "torch.bfloat16"])
def test_ddp_all_reduces_half_gradients_in_half_the_bytes(ranks: list, half: str) -> None:
    buckets = ranks[0]["buckets"]
    reduced = dict(buckets[half]["reduced"])  # one step: one all-reduce per bucket
    numel = buckets[half]["numel"]
    assert set(reduced) == {half, "torch.float32"}  # the norm layer's fp32 grads apart
    assert reduced[half] == 2 * numel[half]
    assert reduced["torch.float32"] == 4 * numel["torch.float32"]
    fp32_model = dict(buckets["torch.float32"]["reduced"])
    assert fp32_model == {"torch.float32": 4 * (numel[half] + numel["torch.float32"])}
    assert reduced[half] * 2 == fp32_model["torch.float32"] - reduced["torch.float32"]


def test_inf_on_one_rank_skips_the_step_on_every_rank(ranks: list) -> None:
    rank0, rank1 = (r["skip"]["data_parallel=True"] for r in ranks)
    # step 2: inf in rank 1's gradient after DDP reduced it; step 3: inf in rank 1's input
    expected = [(True, 256.0), (True, 256.0), (False, 128.0), (False, 64.0)]
    assert rank0["log"] == rank1["log"] == expected
    assert rank0["skipped"] == rank1["skipped"] == 2
    for rank in (rank0, rank1):
        assert torch.equal(rank["before_step2"], rank["after_step2"])
    assert torch.equal(rank0["final"], rank1["final"])


def test_without_the_overflow_all_reduce_the_ranks_diverge(ranks: list) -> None:
    rank0, rank1 = (r["skip"]["data_parallel=False"] for r in ranks)
    assert rank0["log"][2] == (True, 256.0) and rank1["log"][2] == (False, 128.0)
    assert not torch.equal(rank0["final"], rank1["final"])


def test_two_ranks_match_one_process_with_twice_the_batch(ranks: list) -> None:
    two_ranks = ranks[0]["match"]["masters"]
    assert torch.equal(two_ranks, ranks[1]["match"]["masters"])
    one_process = single_process(6, flat_master=True)
    torch.testing.assert_close(two_ranks, one_process, rtol=0, atol=FP16_ROUNDING)
    half_batch = single_process(6, world_size=2, flat_master=True)  # without the all-reduce
    assert (two_ranks - half_batch).abs().max() > 50 * FP16_ROUNDING


def test_accumulation_reduces_once_per_step_and_sums_every_micro_batch(ranks: list) -> None:
    rank0, rank1 = (r["accumulation"]["data_parallel=True"] for r in ranks)
    assert rank0["reductions"] == 4 * 2  # 4 steps, 2 buckets, once per step: no_sync held
    assert torch.equal(rank0["masters"], rank1["masters"])
    one_process = single_process(4)
    torch.testing.assert_close(rank0["masters"], one_process, rtol=0, atol=FP16_ROUNDING)


def test_fp32_accumulation_between_backwards_misses_no_sync_micro_batches(ranks: list) -> None:
    rank0, rank1 = (r["accumulation"]["data_parallel=False"] for r in ranks)
    assert not torch.equal(rank0["masters"], rank1["masters"])
    assert (rank0["masters"] - single_process(4)).abs().max() > 50 * FP16_ROUNDING


def test_saved_on_rank0_resumed_on_both_ranks_continues_identically(ranks: list) -> None:
    for rank in ranks:
        straight, resumed = rank["resume"]["straight"], rank["resume"]["resumed"]
        assert torch.equal(straight["masters"], resumed["masters"])
        assert torch.equal(straight["model"], resumed["model"])
        assert straight["scaler"] == resumed["scaler"]
        assert straight["scaler"]["scale"] > 2.0**8  # the scale moved after the resume point
    assert torch.equal(
        ranks[0]["resume"]["resumed"]["masters"], ranks[1]["resume"]["resumed"]["masters"]
    )
    # save_on_rank0 when rank 0 cannot write: rank 0 raises its error, the others are told
    assert [r["resume"]["failed_save"] for r in ranks] in (
        ["FileExistsError", "RuntimeError"],
        ["NotADirectoryError", "RuntimeError"],
    )


def test_fsdp2_with_mixprec_policy_and_scaler_matches_ddp(ranks: list) -> None:
    rank0, rank1 = (r["fsdp"] for r in ranks)
    assert rank0["output_dtypes"] == ["torch.float16"]  # compute in half ...
    assert rank0["shard_dtypes"] == ["torch.float32"]  # ... on fp32 sharded masters
    # the inf was in rank 1's shard only: both ranks skipped step 2 and backed off
    assert rank0["log"] == rank1["log"] == rank0["ddp_log"]
    assert [applied for applied, _ in rank0["log"]] == [True, True, False, True, True]
    assert torch.equal(rank0["params"], rank1["params"])
    torch.testing.assert_close(rank0["params"], rank0["ddp_masters"], rtol=0, atol=FP16_ROUNDING)


def test_flat_masters_and_bucket_views_do_not_change_the_numbers(ranks: list) -> None:
    # DDP copies the reduced buckets into the flat masters' gradient views in place (or,
    # with gradient_as_bucket_view, re-points them and the optimizer copies them back)
    runs = list(ranks[0]["identical"].values())
    for run in runs[1:]:
        assert torch.equal(run["masters"], runs[0]["masters"])
