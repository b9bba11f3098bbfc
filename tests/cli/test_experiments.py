"""The numerical-fidelity experiments on tiny configurations: their JSON, tables and plots."""

import json

import pytest
import torch

from mixprec import cli
from mixprec.cli.experiments.loop import RunRecord, train_run
from mixprec.cli.experiments.report import format_table, mean_curve, summarize
from mixprec.cli.experiments.tasks import sort_data, sort_task
from mixprec.cli.experiments.underflow import gradient_census, underflow_task

PNG = b"\x89PNG\r\n\x1a\n"


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_parity_json_on_tiny_configs(tmp_path, capsys):
    plot = tmp_path / "parity.png"
    argv = ["experiment", "parity", "--tiny", "--seeds", "2", "--json", "--plot", str(plot)]
    assert cli.main(argv) == 0
    data = _last_json(capsys)
    runs = data["runs"]
    assert [(r["task"], r["precision"]) for r in runs] == [
        (t, p) for t in ("digits", "sort") for p in ("fp32", "fp16", "bf16")
    ]
    for r in runs:
        assert 0 <= r["accuracy_mean"] <= 1 and r["accuracy_std"] >= 0
        assert r["seeds"] == [0, 1] and len(r["accuracies"]) == 2
        assert r["accuracy_mean"] == pytest.approx(sum(r["accuracies"]) / 2, abs=1e-5)
    assert plot.read_bytes()[:8] == PNG


def test_underflow_json_reports_the_flushed_share(tmp_path, capsys):
    argv = ["experiment", "underflow", "--tiny", "--seeds", "1", "--json", "--plot", ""]
    assert cli.main(argv) == 0
    data = _last_json(capsys)
    assert [r["precision"] for r in data["runs"]] == ["fp32", "fp16-noscale", "fp16", "bf16"]
    for when in ("at_init", "after_fp32_training"):
        act = data["census"][when]["activations"]
        # without scaling most activation gradients flush; at the fp16 run's scale none do
        assert act["flushed_fp16"] > 0.5 and act["nonzero_fp16"] < 0.5 * act["nonzero_fp32"]
        assert act["nonzero_fp16_scaled"] == pytest.approx(act["nonzero_fp32"], abs=0.01)
        assert act["predicted_flush"] > 0.5
    assert data["census"]["at_init"]["scale"] == 2.0**16


def test_census_without_a_small_loss_flushes_nothing():
    task = underflow_task(tiny=True, loss_weight_log2=0)
    x, y, *_ = task.make_data(0)
    torch.manual_seed(0)
    census = gradient_census(task.make_model(), (x[:32], y[:32]), task, scale=1.0)
    assert census["activations"]["flushed_fp16"] < 0.05
    assert census["activations"]["predicted_flush"] < 0.01


def test_diagnose_command_json(capsys):
    assert cli.main(["diagnose", "--model", "underflow", "--tiny", "--json"]) == 0
    data = _last_json(capsys)
    assert data["model"] == "underflow"
    assert data["activations"]["fp16"]["underflow"] > 0.5
    assert data["activations"]["bf16"]["underflow"] == 0
    low, high = data["scale_range"]["fp16"]
    assert low >= 2.0**10 and high > low


def test_train_run_records_every_step_and_the_scaler():
    task = sort_task(tiny=True)
    record = train_run(task, "fp16", seed=0, keep_model=True)
    assert len(record.losses) == 4  # 256 sequences, batch 64, 1 epoch
    assert record.loss_scale == 2.0**16 and record.skipped_steps == 0
    assert record.model is not None and record.model.head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        train_run(task, "fp8", seed=0)


def test_sort_data_is_sorted_and_seeded():
    x, y, xv, _ = sort_data(3, 10, 5)
    assert torch.equal(y, x.sort(dim=1).values) and x.shape == (10, 8) and xv.shape == (5, 8)
    assert torch.equal(sort_data(3, 10, 5)[0], x) and not torch.equal(sort_data(4, 10, 5)[0], x)


def _record(precision, seed, accuracy, losses=(1.0, 0.5)):
    return RunRecord("t", precision, seed, accuracy, 0.1, list(losses), 0, None, 1.0)


def test_summarize_mean_std_and_gap_to_fp32():
    records = [_record("fp32", 0, 0.90), _record("fp32", 1, 0.92), _record("fp16", 0, 0.89)]
    rows = summarize([*records, _record("fp16", 1, 0.93)])
    fp32, fp16 = rows
    assert fp32.accuracy_mean == pytest.approx(0.91) and fp32.accuracy_std == pytest.approx(
        0.0141421, rel=1e-4
    )
    assert fp16.delta_vs_fp32 == pytest.approx(0.0) and fp32.delta_vs_fp32 == 0
    assert "| t | fp16 | 2 | 91.00 ± 2.83 | +0.00 |" in format_table(rows)
    mean, low, high = mean_curve([_record("a", 0, 0, (1, 3, 5)), _record("a", 1, 0, (3, 5))], 2)
    assert mean.tolist() == [3.0] and low.tolist() == [2.0] and high.tolist() == [4.0]


def test_unknown_names_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", "parity", "--tasks", "imagenet"])
    assert exit_info.value.code == 2
    assert "--tasks: expected a comma-separated list from digits,sort" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", "underflow", "--precisions", "fp32,fp8"])
    assert exit_info.value.code == 2
    assert "got unknown 'fp8'" in capsys.readouterr().err
