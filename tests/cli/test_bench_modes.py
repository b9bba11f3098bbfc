"""`mixprec bench modes` (the digits demo per mode and dtype; bf16 only here, fp16 is slow on
CPU) and `mixprec bench telemetry`."""

import json

import pytest

from mixprec.cli.bench.modes import measure
from mixprec.cli.bench.telemetry import measure as measure_telemetry
from mixprec.cli.main import main

CASES = ("fp32", "master-bf16", "autocast-bf16")


def test_measure_compares_accuracy_time_and_memory_of_the_modes():
    result = measure(epochs=1, repeats=1, cases=CASES)
    fp32, master, auto = (result["cases"][c] for c in CASES)
    for c in (fp32, master, auto):
        assert 0.5 < c["accuracy"] <= 1.0
    assert (master["mode"], auto["mode"]) == ("master", "autocast")
    # fp32 AdamW: 16 bytes a parameter; half params and grads beside fp32 masters and moments
    # (the fused step keeps no fp32 master grads between steps): 16 too; autocast keeps the
    # fp32 model's: 16. The digits CNN is mostly parameters.
    assert auto["state_bytes"] == fp32["state_bytes"]
    assert master["state_bytes"] / fp32["state_bytes"] == pytest.approx(16 / 16, rel=0.02)
    # half activations in both modes; autocast also saves its half copies of the weights
    assert master["saved_bytes"] < auto["saved_bytes"] < 0.7 * fp32["saved_bytes"]
    with pytest.raises(ValueError, match="unknown case"):
        measure(cases=["master-fp8"])


def test_the_command_prints_the_table_and_json(capsys):
    args = ["bench", "modes", "--epochs", "1", "--repeats", "1", "--cases", "master-bf16"]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[0] == "master-bf16"  # title, header, rule, the row
    assert json.loads(out.splitlines()[-1])["cases"]["master-bf16"]["mode"] == "master"


def test_the_telemetry_bench_times_both_engines_off_and_on():
    result = measure_telemetry(n_params=10_000, repeats=2)
    for name in ("fused", "autocast"):
        assert result[f"{name}_off_ms"] > 0 and result[f"{name}_on_ms"] > 0
    assert 0 < result["off_hook_us"] < 1000 and result["n_params"] > 9000
