"""The benchmarks on tiny configs: structure and consistency of what they report, no timings."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixprec import cli
from mixprec.cli.bench import gpu, memory, overhead
from mixprec.core import native

ROOT = Path(__file__).resolve().parents[2]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_overhead_layer_shapes_cover_the_requested_size_in_100_tensors():
    shapes = overhead.layer_shapes(10_000_000)
    assert len(shapes) == 100
    n = sum(math.prod(s) for s in shapes)
    assert 0.99e7 < n < 1.01e7


def test_overhead_cli_prints_a_table_then_one_json_row_per_size(capsys):
    assert (
        cli.main(["bench", "overhead", "--sizes", "3000", "6e3", "--repeats", "1", "--json"]) == 0
    )
    out = capsys.readouterr().out
    assert "flat/floor" in out and "step/amp" in out
    result = _last_json(out)
    assert list(result) == ["rows"]
    rows = result["rows"]
    assert [list(r) for r in rows] == [list(overhead.KEYS)] * 2
    assert [r["n_params"] for r in rows] == [
        sum(math.prod(s) for s in overhead.layer_shapes(n)) for n in (3000, 6000)
    ]
    assert all(r[k] > 0 for r in rows for k in overhead.KEYS)


def test_overhead_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "overhead", "--sizes", "0", "--repeats", "1"])
    assert exit_info.value.code == 2
    assert "--sizes: expected a whole number >= 1 (e.g. 1e6), got '0'" in capsys.readouterr().err


def test_benchmark_script_runs_from_a_checkout():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--sizes", "2000",
         "--repeats", "1", "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert list(_last_json(proc.stdout)["rows"][0]) == list(overhead.KEYS)


def test_memory_counts_state_per_parameter_and_saved_activations(capsys):
    assert cli.main(["bench", "memory", "--n-params", "20000", "--batch", "2", "--json"]) == 0
    out = capsys.readouterr().out
    result = _last_json(out)
    assert list(result) == list(memory.KEYS)
    assert result["state_bytes_per_param"] == {
        "fp32_adam": 16.0,  # fp32 params, grads, two moments
        "fastai_v1": 20.0,  # half params and grads, fp32 masters and master grads, moments
        "mixprec_unfused": 20.0,
        "mixprec_fused": 16.0,  # no fp32 grads: half params and grads, masters, moments
        "mixprec_split": 14.0,  # bf16 weights + 16 low bits, bf16 grads, moments
        # after zero_grad, and after fit: bf16 weights, fp32 masters, moments; no gradient
        "plain_loop_bf16": 14.0,
        "learner_bf16": 14.0,
    }
    fused_line = next(line for line in out.splitlines() if "mixprec_fused" in line)
    assert "1,048," in fused_line  # its fixed 1 MiB fp32 scratch
    assert result["saved_bytes_ratio_cnn"] <= 0.52  # BatchNorm keeps its half input
    assert 0.4 < result["saved_bytes_ratio_transformer"] < 1.0


def test_saved_bytes_leaves_parameters_out_and_counts_each_storage_once():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
    x = torch.randn(4, 10)
    # Linear 1 saves x (4x10), ReLU its output (4x10), Linear 2 that same output: 2 storages
    assert memory.saved_bytes(model, x) == 2 * 4 * 10 * 4


def test_gpu_bench_smoke_on_cpu_reports_every_config():
    result = gpu.measure("cpu", tiny=True, models=("gpt", "resnet"), warmup=0, steps=1, batch=1)
    assert result["device"] == "cpu"
    assert [(r["model"], r["config"]) for r in result["rows"]] == [
        (m, c) for m in gpu.MODELS for c in gpu.CONFIGS
    ]
    for r in result["rows"]:
        assert r["throughput"] > 0 and r["peak_mem_gib"] is None
        units = 64 if r["model"] == "gpt" else 1
        assert r["throughput"] == pytest.approx(units / (r["step_ms"] / 1e3), rel=0.01)
    assert "x amp fp16" in gpu.format_report(result)


def test_gpu_bench_without_cuda_says_what_to_do(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["bench", "gpu"]) == 2
    assert "--device cpu --tiny" in capsys.readouterr().out


@pytest.mark.skipif(native.library() is None, reason="no native kernels here")
def test_subnormal_moments_script_counts_them_per_step_flushed_or_not():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "subnormal_moments.py"), "--tiny",
         "--steps", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = [line.split() for line in proc.stdout.strip().splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 5 for r in rows)
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)
    assert all(r[4] == "0" for r in rows)  # flushed: none can be subnormal


def test_step_parts_script_times_each_part_of_the_native_step():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_parts.py"), "--layers", "1",
         "--repeats", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row[0] == f"{2**20:,}" and len(row) == 7
    assert all(float(v) >= 0 for v in row[1:])
