"""`mixprec bench optimizer` on a tiny size: every case is timed, the table and JSON agree."""

import json

import pytest

from mixprec import cli
from mixprec.cli.bench import optimizer


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_one_tiny_size_reports_every_case_with_ratios_from_its_own_times(capsys, clock):
    argv = ["bench", "optimizer", "--sizes", "1", "--repeats", "1", "--warmup", "0", "--json"]
    argv += ["--clock", clock, "--threads", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["clock"] == clock
    rows = result["rows"]
    assert [r["case"] for r in rows] == list(optimizer.CASES)
    assert {r["n_params"] for r in rows} == {optimizer.WIDTH**2}  # one whole layer
    fused = next(r for r in rows if r["case"] == "torch_fused")
    for r in rows:
        assert r["ms"] > 0
        assert r["bytes_per_param"] == optimizer.BYTES[r["case"]]
        assert r["vs_torch_fused"] == pytest.approx(r["ms"] / fused["ms"], rel=1e-2, abs=1e-3)
        gb_s = r["bytes_per_param"] * r["n_params"] / (r["ms"] * 1e-3) / 1e9
        assert r["gb_s"] == pytest.approx(gb_s, rel=1e-2, abs=1e-3)
    table = [line for line in lines[:-1] if line.strip().startswith("1,048,576")]
    assert len(table) == len(optimizer.CASES)  # one printed line per case
    for line, r in zip(table, rows):
        assert optimizer.LABELS[r["case"]] in line
        printed_ms, printed_ratio = float(line.split()[-4]), float(line.split()[-1])
        assert printed_ms == pytest.approx(r["ms"], abs=0.006)
        assert printed_ratio == pytest.approx(r["vs_torch_fused"], abs=0.006)
