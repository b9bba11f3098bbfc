"""`mixprec bench faults`: inject faults into training and count what was lost.

Faults: inf/nan written into half gradients at random steps and parameters, inf/nan losses
and inputs (every engine configuration: per-tensor and flat masters, the fused step,
clipping, static and dynamic scales, accumulation); on one rank only of a 2-process gloo
group; finite bf16 gradients whose global norm overflows fp32 under clipping; a user
callback raising at every event of a batch, KeyboardInterrupt mid-epoch and
a disk filling up during a checkpoint save (ENOSPC: the previous checkpoint must stay intact
and training resume from it) in the Learner; `learn.validate()` called from a callback
inside `fit`, and a module of the model replaced between fits. Each run is compared bit for
bit with the run that should result (see `fault_injection` and `fault_learner`). The
schedules are seeded: the figures are the same on every run.

Reported: faults injected, steps skipped (must equal the faulted steps), updates lost
(clean steps whose update did not land or whose state differs from the reference: must
be 0), and wrong overflow reports (must be 0).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mixprec.cli.bench.common import (
    add_common_arguments,
    apply_threads,
    describe_machine,
    format_table,
    print_result,
)
from mixprec.cli.bench.fault_injection import CONFIGS, run_faults, schedule
from mixprec.cli.bench.fault_learner import (
    BATCH_EVENTS,
    IN_STEP,
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
from mixprec.cli.options import non_negative_int, positive_int
from mixprec.parallel.distributed import DistEnv

__all__ = ["Tally", "add_arguments", "measure", "run"]

LEARNER_CONFIGS = (
    LearnerConfig("per-tensor"),
    LearnerConfig("flat", flat_master=True),
    LearnerConfig("fused dynamic", fused=True, loss_scale="dynamic"),
)


@dataclass
class Tally:
    """Counts over the runs of one scenario."""

    scenario: str
    runs: int = 0
    faults: int = 0
    faulted_steps: int = 0
    skipped: int = 0
    lost: int = 0
    problems: int = 0  # state mismatches and wrong overflow reports

    def row(self) -> list[Any]:
        return [
            self.scenario,
            self.runs,
            self.faults,
            self.faulted_steps,
            self.skipped,
            self.lost,
            self.problems,
        ]


HEADERS = ("scenario", "runs", "faults", "faulted steps", "skipped", "updates lost", "problems")


def _engine(runs: int, steps: int, faults: int, seed: int) -> list[Tally]:
    tallies = []
    for i, config in enumerate(CONFIGS):
        tally = Tally(f"engine: {config.name}")
        rng = random.Random(seed + i)
        for _ in range(runs):
            r = run_faults(config, schedule(rng, steps, faults, config.kinds), steps)
            tally.runs += 1
            tally.faults += r.faults
            tally.faulted_steps += r.faulted_steps
            tally.skipped += r.skipped
            tally.lost += r.lost
            tally.problems += len(r.mismatches) + len(r.misnamed)
        tallies.append(tally)
    return tallies


def _learner(seed: int) -> list[Tally]:
    raised = Tally("learner: callback raises mid-batch")
    interrupted = Tally("learner: KeyboardInterrupt mid-epoch")
    grads = Tally("learner: inf/nan gradients")
    for config in LEARNER_CONFIGS:
        for where, error, late, step in itertools.product(
            WHERE, (RuntimeError, KeyboardInterrupt), (False, True), range(4)
        ):
            if late and where not in BATCH_EVENTS:
                continue
            tally = raised if error is RuntimeError else interrupted
            r = run_stop(config, Stop(step, where, error, late))
            tally.runs += 1
            tally.faults += r.faults
            tally.lost += r.lost
            tally.problems += len(r.problems)
    in_step = Tally("learner: SIGINT inside the optimizer step")
    at_end = Tally("learner: KeyboardInterrupt in on_train_end")
    for config in LEARNER_CONFIGS:
        for tally, stop in [
            *((in_step, Stop(step, IN_STEP, KeyboardInterrupt)) for step in range(4)),
            (at_end, Stop(0, TRAIN_END, KeyboardInterrupt)),
        ]:
            r = run_stop(config, stop)
            tally.runs += 1
            tally.faults += r.faults
            tally.lost += r.lost
            tally.problems += len(r.problems)
    rng = random.Random(seed)
    for config in LEARNER_CONFIGS[:2]:  # static scale: the reference drops the faulted batches
        for _ in range(8):
            steps = rng.sample(range(8), 3)
            values = (float("inf"), float("-inf"), float("nan"))
            faults = {
                s: (rng.randrange(6), rng.randrange(1 << 16), rng.choice(values)) for s in steps
            }
            r = run_grad_faults(config, faults)
            grads.runs += 1
            grads.faults += r.faults
            grads.faulted_steps += r.expected_skips
            grads.skipped += r.skipped
            grads.lost += r.lost
            grads.problems += len(r.problems)
    disk_full = Tally("learner: disk full during a save")
    for config in LEARNER_CONFIGS:
        for at in (1, 2):
            r = run_disk_full(config, at)
            disk_full.runs += 1
            disk_full.faults += r.faults
            disk_full.lost += r.lost
            disk_full.problems += len(r.problems)
    reentrant = Tally("learner: validate() from a callback mid-fit")
    replaced = Tally("learner: module replaced between fits")
    for config in LEARNER_CONFIGS:
        for event in ("on_batch_begin", "on_loss_begin", "on_backward_end", "on_step_end"):
            r = run_reentrant_validate(config, event, rng.sample(range(8), 3))
            reentrant.runs += 1
            reentrant.faults += r.faults
            reentrant.lost += r.lost
            reentrant.problems += len(r.problems)
        for _ in range(2):
            r = run_replaced_module(config, rng.randrange(1 << 16))
            replaced.runs += 1
            replaced.faults += r.faults
            replaced.lost += r.lost
            replaced.problems += len(r.problems)
    return [raised, interrupted, in_step, at_end, grads, disk_full, reentrant, replaced]


def _rank_worker(rank: int, store_path: str, steps: int, faults: int, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2)
    results = []
    for i, config in enumerate(CONFIGS):
        plan = schedule(random.Random(seed + 100 + i), steps, faults, world_size=2)
        r = run_faults(config, plan, steps, env)
        one_rank = sum(f.rank is not None for f in plan)
        problems = len(r.mismatches) + len(r.misnamed)
        results.append([r.faults, one_rank, r.faulted_steps, r.skipped, r.lost, problems])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _distributed(steps: int, faults: int, seed: int) -> Tally:
    """The engine configurations under DDP on 2 gloo processes, faults mostly on one rank:
    steps counted once, what was lost or wrong on either rank."""
    with tempfile.TemporaryDirectory() as out:
        store = os.path.join(out, "store")
        torch.multiprocessing.spawn(_rank_worker, (store, steps, faults, seed, out), nprocs=2)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    one_rank = sum(row[1] for row in ranks[0])
    tally = Tally(f"2 ranks (gloo), {one_rank} faults on one rank only")
    for rank0, rank1 in zip(*ranks):
        tally.runs += 1
        tally.faults += rank0[0]
        tally.faulted_steps += rank0[2]
        tally.skipped += rank0[3]
        tally.lost += rank0[4] + rank1[4]
        tally.problems += rank0[5] + rank1[5] + (rank0[3] != rank1[3])
    return tally


def measure(
    runs: int = 12, steps: int = 8, faults: int = 3, seed: int = 0, distributed: bool = True
) -> dict[str, Any]:
    """Every scenario's counts, and their totals."""
    tallies = _engine(runs, steps, faults, seed) + _learner(seed)
    if distributed:
        tallies.append(_distributed(steps, faults, seed))
    total = Tally("total")
    for t in tallies:
        for key in ("runs", "faults", "faulted_steps", "skipped", "lost", "problems"):
            setattr(total, key, getattr(total, key) + getattr(t, key))
    return {"scenarios": [vars(t) for t in tallies], "total": vars(total)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument(
        "--runs", type=positive_int, default=12, help="seeded runs per engine configuration"
    )
    parser.add_argument("--steps", type=positive_int, default=8, help="steps per run")
    parser.add_argument("--faults", type=positive_int, default=3, help="faults per run")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed")
    parser.add_argument(
        "--no-distributed", action="store_true", help="skip the 2-process gloo runs"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the table; exit status 1 if anything was lost or a report was wrong."""
    apply_threads(args.threads)
    result = measure(args.runs, args.steps, args.faults, args.seed, not args.no_distributed)
    rows = [Tally(**s).row() for s in result["scenarios"]] + [Tally(**result["total"]).row()]
    text = "\n".join(
        [
            f"fault injection ({describe_machine()}); skipped counts steps, a step may hold "
            "several faults",
            format_table(HEADERS, rows),
        ]
    )
    print_result(text, result, args.json)
    total = result["total"]
    return int(
        total["lost"] > 0 or total["problems"] > 0 or total["skipped"] != total["faulted_steps"]
    )
