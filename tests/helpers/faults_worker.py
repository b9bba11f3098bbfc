"""Runs on every rank of a 2-process gloo group started by test_faults_distributed.py: the
engine's fault-injection runs under DDP, with faults that hit one rank only.

Usage: python faults_worker.py OUT_DIR  -> OUT_DIR/rank{RANK}.pt, one result per config.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from mixprec.cli.bench.fault_injection import CONFIGS, run_faults, schedule
from mixprec.parallel.distributed import cleanup_distributed, init_distributed

STEPS = 8
FAULTS_PER_RUN = 5
SEED = 2024


def faults_for(index: int) -> list:
    """The same schedule on every rank: most faults on one rank, some on both."""
    return schedule(random.Random(SEED + index), STEPS, FAULTS_PER_RUN, world_size=2)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    env = init_distributed("gloo", timeout=timedelta(seconds=60))
    results = {}
    for i, config in enumerate(CONFIGS):
        faults = faults_for(i)
        result = asdict(run_faults(config, faults, STEPS, env))
        result["one_rank_faults"] = sum(f.rank is not None for f in faults)
        results[config.name] = result
    torch.save(results, out / f"rank{env.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
