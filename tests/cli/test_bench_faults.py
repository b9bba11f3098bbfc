"""`mixprec bench faults`: the table, the JSON and the exit status (the scenarios themselves
are tested in test_faults*.py)."""

from __future__ import annotations

import argparse
import json

import mixprec.cli.bench.faults as bench_faults
from mixprec.cli.bench.fault_injection import CONFIGS, RunResult


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_faults.add_arguments(parser)
    return parser.parse_args(["--runs", "1", "--steps", "3", "--no-distributed", "--json", *argv])


def test_the_benchmark_prints_the_counts_and_exits_0_when_nothing_is_lost(monkeypatch, capsys):
    monkeypatch.setattr(bench_faults, "_learner", lambda seed: [])
    assert bench_faults.run(_args()) == 0
    out = capsys.readouterr().out
    assert "engine: fused flat clip" in out and "updates lost" in out
    total = json.loads(out.splitlines()[-1])["total"]
    # one run of 3 steps per engine configuration, 3 faults each
    assert total["runs"] == len(CONFIGS) and total["faults"] == 3 * len(CONFIGS)
    assert total["lost"] == 0
    assert total["skipped"] == total["faulted_steps"] > 0


def test_a_lost_update_makes_the_benchmark_fail(monkeypatch, capsys):
    monkeypatch.setattr(bench_faults, "_learner", lambda seed: [])
    lossy = RunResult("x", steps=3, faults=1, faulted_steps=1, skipped=1, lost=1)
    monkeypatch.setattr(bench_faults, "run_faults", lambda *a, **k: lossy)
    assert bench_faults.run(_args()) == 1
    total = json.loads(capsys.readouterr().out.splitlines()[-1])["total"]
    assert total["lost"] == len(CONFIGS)
