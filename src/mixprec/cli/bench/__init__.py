"""`mixprec bench NAME`: the benchmarks, importable from an installed package.

Each benchmark module has `add_arguments(parser)`, `run(args) -> int` and a `measure(...)`
that returns the JSON-ready result; `benchmarks/NAME.py` runs the same code from a checkout.
"""

from __future__ import annotations

import argparse
import importlib

from mixprec.cli.options import Parser

__all__ = ["BENCHMARKS", "add_arguments", "main", "run"]

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "overhead": (
        "mixprec.cli.bench.overhead",
        "optimizer-phase time: mixprec vs torch.amp vs floor",
    ),
    "optimizer": (
        "mixprec.cli.bench.optimizer",
        "one AdamW step: mixprec's modes vs torch's fused and foreach, ms, bytes, GB/s",
    ),
    "step": (
        "mixprec.cli.bench.step",
        "whole training steps on five model families, every mode, with peak memory",
    ),
    "memory": ("mixprec.cli.bench.memory", "training-state bytes per parameter, activation memory"),
    "gpu": (
        "mixprec.cli.bench.gpu",
        "throughput and peak memory on a GPT-2-like and a ResNet-like",
    ),
    "modes": ("mixprec.cli.bench.modes", "digits demo per mode and dtype: accuracy, time, memory"),
    "telemetry": ("mixprec.cli.bench.telemetry", "optimizer step time with telemetry off and on"),
    "faults": (
        "mixprec.cli.bench.faults",
        "inject inf/nan, exceptions and interrupts; count what is lost",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per benchmark, each with its own options."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub_parser)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named by `args.benchmark`."""
    return int(importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args) or 0)


def main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of `benchmarks/NAME.py`: parse `argv` with NAME's options and run it."""
    module = importlib.import_module(BENCHMARKS[name][0])
    parser = Parser(prog=f"benchmarks/{name}.py", description=BENCHMARKS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)
