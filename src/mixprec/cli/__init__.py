"""The `mixprec` command and what it runs: the demo, the experiments and the benchmarks.
Uses only the layers below it."""

from mixprec.cli.main import main

__all__ = ["main"]
