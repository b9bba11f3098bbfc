"""`mixprec experiment NAME`: the numerical-fidelity experiments, one module each."""

from __future__ import annotations

import argparse
import importlib

__all__ = ["EXPERIMENTS", "add_arguments", "run"]

# experiment -> (module with add_arguments(parser) and run(args) -> int, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "parity": (
        "mixprec.cli.experiments.parity",
        "digits CNN and a small transformer in fp32, fp16 and bf16 over seeds: accuracy table",
    ),
    "underflow": (
        "mixprec.cli.experiments.underflow",
        "a setting where fp16 gradients flush to zero without loss scaling, and with it",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, (module_name, help_text) in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        experiment_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(experiment_parser)
        experiment_parser.set_defaults(_experiment_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._experiment_run(args) or 0)
