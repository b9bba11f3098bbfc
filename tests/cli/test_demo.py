import json

import pytest

from mixprec.cli.main import main


def test_train_json_compares_precisions_within_two_points(capsys):
    assert main(["train", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    by_precision = {r["precision"]: r for r in runs}
    assert list(by_precision) == ["fp32", "fp16", "bf16"]
    for r in runs:
        assert {"accuracy", "seconds", "skipped_steps", "loss_scale"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
    assert by_precision["fp32"]["accuracy"] > 0.9
    assert by_precision["fp32"]["loss_scale"] is None
    for half in ("fp16", "bf16"):
        assert abs(by_precision[half]["accuracy"] - by_precision["fp32"]["accuracy"]) <= 0.02
        assert by_precision[half]["loss_scale"] > 0


def test_train_prints_a_table(capsys):
    assert main(["train", "--epochs", "1", "--precisions", "fp32,bf16"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "bf16" in out and "fp16" not in out


def test_unknown_precision_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--precisions", "fp8"])
    assert exit_info.value.code == 2
    assert "--precisions: expected a comma-separated list" in capsys.readouterr().err


def test_subcommand_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--epochs" in capsys.readouterr().out
