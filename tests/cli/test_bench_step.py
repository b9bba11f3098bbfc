"""`mixprec bench step` on its tiny config: every family and mode runs, the JSON holds."""

import dataclasses
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
    assert set(result) == {"rows", "default_mode", "steps"}
    assert result["default_mode"] == step.default_mode() == "per-tensor+fused"
    rows = result["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {(f, m) for f in FAMILIES for m in step.MODES}
    assert "x best" in out and "NOT A TRAINING STEP" not in out
    for r in rows:
        assert {"model", "mode", "ms", "vs_fp32", "vs_best", "vs_autocast", "peak_mib"} <= set(r)
        assert r["ms"] > 0 and r["peak_mib"] is None and r["compiled"] is False
        assert r["skipped"] == (None if r["mode"] in step.BASELINES else 0)
        fp32 = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "fp32")
        amp = next(x for x in rows if x["model"] == r["model"] and x["mode"] == "autocast")
        best = next(
            x for x in rows if x["model"] == r["model"] and x["mode"] == "autocast+fusedadamw"
        )
        assert r["vs_fp32"] == pytest.approx(r["ms"] / fp32["ms"], rel=1e-2, abs=1e-3)
        if r["mode"] != "fp32":
            assert r["vs_autocast"] == pytest.approx(r["ms"] / amp["ms"], rel=1e-2, abs=1e-3)
            assert r["vs_best"] == pytest.approx(r["ms"] / best["ms"], rel=1e-2, abs=1e-3)


def test_compile_runs_both_sides_compiled_beside_eager_with_ratios_to_compiled_baselines(
    monkeypatch,
):
    compiled = []

    def fake_compile(model):  # the plumbing, without minutes of compilation
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    modes = ("autocast+fusedadamw", "default")
    result = step.measure(("gpt",), modes, ("bf16",), tiny=True, repeats=1, warmup=0,
                          memory=False, compile=True)  # fmt: skip
    rows = result["rows"]
    assert sorted((r["mode"], r["compiled"]) for r in rows) == sorted(
        (m, c) for m in modes for c in (False, True)
    )
    assert len(compiled) == len(modes)  # one compiled model per mode, torch's and mixprec's
    assert next(compiled[1].parameters()).dtype == torch.bfloat16  # compiled after conversion
    for r in rows:
        best = next(
            x for x in rows if x["mode"] == "autocast+fusedadamw" and x["compiled"] == r["compiled"]
        )
        assert r["vs_best"] == pytest.approx(r["ms"] / best["ms"], rel=1e-2, abs=1e-3)


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


def test_the_peak_memory_child_prints_its_rise_in_mib(capsys, monkeypatch):
    # what the fresh process of step.peak_mib runs (a subprocess costs seconds: run it here),
    # its resident-memory readings pinned: 5000 KiB at the reset, 8072 KiB at the peak
    monkeypatch.setattr(step, "_reset_peak_rss", lambda: 5000)
    monkeypatch.setattr(step, "_peak_rss_kib", lambda: 5000 + 3072)
    step._peak_child("gpt", "split", "bf16", "cpu", True, 1, torch.get_num_threads())
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == 3.0  # the rise, in MiB


def test_a_split_mode_in_fp16_is_left_out():
    result = step.measure(("gpt",), ("autocast", "split"), ("fp16",), tiny=True, repeats=1,
                          warmup=0, memory=False)  # fmt: skip
    assert [r["mode"] for r in result["rows"]] == ["autocast"]


def test_a_mode_whose_steps_are_skipped_is_reported_as_not_training(monkeypatch):
    def nan_family(name, tiny=False, device="cpu"):  # every gradient non-finite
        fam = family(name, tiny, device)
        return dataclasses.replace(fam, loss=lambda out, y: fam.loss(out, y) * float("nan"))

    monkeypatch.setattr(step, "family", nan_family)
    modes = ("autocast+fusedadamw", "default", "to_fp16")
    result = step.measure(("gpt",), modes, ("bf16",), tiny=True, repeats=2, warmup=1,
                          memory=False)  # fmt: skip
    assert result["steps"] == 3
    skipped = {r["mode"]: r["skipped"] for r in result["rows"]}
    assert skipped == {"autocast+fusedadamw": None, "default": 3, "to_fp16": 3}
    text = step.format_report(result, "title")
    assert "NOT A TRAINING STEP: gpt bf16 default skipped 3 of 3 steps" in text
    assert "NOT A TRAINING STEP: gpt bf16 autocast" not in text
