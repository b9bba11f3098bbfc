"""The command line refuses bad option values before any work, in one line, exit status 2."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from mixprec.cli import main
from mixprec.cli.bench import BENCHMARKS
from mixprec.cli.demo import train
from mixprec.cli.experiments.parity import parity_verdict
from mixprec.cli.experiments.report import Summary
from mixprec.cli.main import make_parser
from mixprec.learner.recorder import Recorder

REFUSED = [
    (["train", "--epochs", "-1"], "--epochs: expected a positive integer, got '-1'"),
    (["train", "--loss-scale", "banana"], "--loss-scale: expected 'dynamic' or a positive finite"),
    (["train", "--loss-scale", "0"], "got '0'"),
    (["train", "--loss-scale", "inf"], "got 'inf'"),
    (["train", "--lr", "-1"], "--lr: expected a positive finite number, got '-1'"),
    (["train", "--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
    (["train", "--threads", "0"], "--threads: expected a positive integer"),
    (["train", "--precisions", ""], "--precisions: expected a comma-separated list from fp32"),
    (["train", "--precisions", "fp32,fp8"], "got unknown 'fp8'"),
    (["bench", "overhead", "--sizes", "-5"], "--sizes: expected a whole number >= 1"),
    (
        ["experiment", "underflow", "--loss-weight-log2", "400"],
        "--loss-weight-log2: expected an integer from -100 to 100",
    ),
    (["bench", "step", "--repeats", "0"], "--repeats: expected a positive integer"),
    (["bench", "step", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["bench", "memory", "--n-params", "1.5e3x"], "--n-params: expected a whole number >= 1000"),
    (["diagnose", "--underflow-threshold", "2"], "expected a share in \\[0, 1\\), got '2'"),
    (["diagnose", "--batch-size", "-3"], "--batch-size: expected a positive integer, got '-3'"),
    (["experiment", "parity", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
    (["experiment", "parity", "--tasks", "imagenet"], "got unknown 'imagenet'"),
    (["train", "--plot", "/proc/x.png"], "--plot: expected a path we can write"),
    (["train", "--plot", "curves.txt"], "--plot: expected a path ending in .png"),
]


@pytest.mark.parametrize(("argv", "message"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_values_are_refused_in_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert lines[0].startswith(f"mixprec {argv[0]}") and "error: argument" in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_plot_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--plot", str(tmp_path / "file" / "x.png")])
    assert exit_info.value.code == 2
    assert "is a file)" in capsys.readouterr().err


def test_a_plot_without_matplotlib_is_refused_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "pip install -e '.[plot]' in the checkout" in capsys.readouterr().err


def test_help_shows_defaults_and_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in BENCHMARKS)
    with pytest.raises(SystemExit):
        main(["experiment", "parity", "--help"])
    assert "--threads THREADS" in (text := capsys.readouterr().out) and "(default: 1)" in text


def _row(task, precision, accuracy, delta):
    return Summary(task, precision, [0], [accuracy], [1.0], 1.0, 1.0, 0, delta)


def test_parity_passes_only_a_comparison_that_learned_something():
    learned = [_row("digits", "fp32", 0.95, 0.0), _row("digits", "bf16", 0.95, 0.0)]
    at_chance = [_row("digits", "fp32", 0.1, 0.0), _row("digits", "bf16", 0.1, 0.0)]
    assert parity_verdict(learned, chance={"digits": 0.1}).startswith("PASS")
    assert parity_verdict(at_chance, chance={"digits": 0.1}).startswith("NO VERDICT")
    assert parity_verdict(learned[:1]).startswith("NO VERDICT")


def test_json_is_printed_before_the_plot_can_fail(monkeypatch, tmp_path, capsys):
    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    def trained(precision, config, progress=False):
        return train.RunResult(precision, 0.9, 1.0, 0, 2.0**16, 0.3), Recorder()

    monkeypatch.setattr(train, "train_digits", trained)
    monkeypatch.setattr(train, "plot_runs", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        main(["train", "--precisions", "bf16", "--json", "--plot", str(tmp_path / "x.png")])
    (run,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert (run["precision"], run["accuracy"]) == ("bf16", 0.9)


def test_an_experiment_writes_no_file_unasked_and_pins_threads(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["experiment", "parity", "--tiny", "--seeds", "1", "--tasks", "digits"]
    try:
        assert main([*argv, "--precisions", "fp32", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert list(tmp_path.iterdir()) == []
    assert "NO VERDICT: no half-precision run" in capsys.readouterr().out


def _commands(parser, prefix=("mixprec",)):
    """(command words, its parser) for every command and subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_the_command_line_page_lists_every_command_and_option():
    page = (Path(__file__).resolve().parents[2] / "docs" / "command-line.md").read_text()
    for words, parser in _commands(make_parser()):
        section = page.split(f"### `{' '.join(words)}`\n", 1)
        assert len(section) == 2, f"no section for {' '.join(words)}"
        body = section[1].split("\n### ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                assert option in body, f"{' '.join(words)} {option}"
