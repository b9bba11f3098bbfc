"""`mixprec bench step` on its tiny config: every family and mode runs, the JSON holds."""

import json

import pytest
import torch

from mixprec import cli
from mixprec.cli.bench import step
from mixprec.cli.bench.step_models import FAMILIES, family


def test_every_family_and_mode_trains_one_tiny_step_and_reports_one_json_object(capsys):
    argv = ["bench", "step", "--tiny", "--repeats", "1", "--warmup", "0", "--no-memory"]
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert "x autocast" in out and "default mode" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"rows", "default_mode"}
    assert result["default_mode"] == step.default_mode() == "per-tensor+fused"
    rows = result["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {(f, m) for f in FAMILIES for m in step.MODES}
    for r in rows:
        assert {"model", "mode", "ms", "vs_fp32", "vs_autocast", "peak_mib"} <= set(r)
        assert r["ms"] > 0 and r["peak_mib"] is None
        fp32 = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "fp32")
        amp = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "autocast")
        assert r["vs_fp32"] == pytest.approx(r["ms"] / fp32["ms"], rel=1e-2, abs=1e-3)
        if r["mode"] != "fp32":
            assert r["vs_autocast"] == pytest.approx(r["ms"] / amp["ms"], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("mode", ["split", "autocast-mode", "to_fp16", "flat"])
def test_a_mode_step_trains_the_model(mode):
    fam = family("gpt", tiny=True)
    model, train = step.build_step(fam, mode, torch.bfloat16, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        train()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(changed)  # every parameter moved (tied embeddings included)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_peak_memory_child_prints_its_rise_in_mib(capsys):
    # what the fresh process of step.peak_mib runs (a subprocess costs seconds: run it here)
    step._peak_child("gpt", "split", "bf16", "cpu", True, 1, torch.get_num_threads())
    mib = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= mib < 1024


def test_a_split_mode_in_fp16_is_left_out():
    result = step.measure(("gpt",), ("autocast", "split"), ("fp16",), tiny=True, repeats=1,
                          warmup=0, memory=False)  # fmt: skip
    assert [r["mode"] for r in result["rows"]] == ["autocast"]
