"""The `mixprec` command: one subcommand per module, each with `add_arguments` and `run`."""

from __future__ import annotations

import importlib
import io
import os
import select
import signal
import sys
from collections.abc import Sequence

from mixprec.cli.bench import BENCHMARKS
from mixprec.cli.experiments.command import EXPERIMENTS
from mixprec.cli.options import Parser

__all__ = ["COMMANDS", "main", "make_parser"]

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mixprec.cli.demo.train", "train the digits CNN in fp32, fp16 and bf16 and compare"),
    "plan": (
        "mixprec.cli.plan_command",
        "show each module's dtype, bytes and risks before training",
    ),
    "bench": (
        "mixprec.cli.bench",
        f"benchmarks: {', '.join(BENCHMARKS)} (mixprec bench NAME --help)",
    ),
    "diagnose": (
        "mixprec.cli.experiments.diagnose_command",
        "histogram a demo model's gradients against the fp16 and bf16 ranges",
    ),
    "experiment": (
        "mixprec.cli.experiments.command",
        f"reproduce the mixed-precision paper's claims: {', '.join(EXPERIMENTS)}",
    ),
}


def make_parser() -> Parser:
    """The `mixprec` parser with every subcommand and its options."""
    parser = Parser(prog="mixprec", description="Mixed-precision training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


# What a shell reports for a command killed by SIGPIPE (the reader of its output left).
PIPE_CLOSED_STATUS = 128 + getattr(signal, "SIGPIPE", 13)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (POLLERR); True when it cannot be told."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True


def _stdout_to_devnull() -> None:
    """Point stdout at the null device, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is no file (replaced in-process): nothing is flushed to a pipe at exit


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; return its exit status (2: a bad option;
    141 when the reader of stdout closed the pipe: `mixprec plan ... --json | head` stops
    quietly, as command-line tools do on SIGPIPE)."""
    try:
        args = make_parser().parse_args(argv)
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe broke (a worker's): that is a failure to report
        _stdout_to_devnull()
        return PIPE_CLOSED_STATUS
    return status


if __name__ == "__main__":
    sys.exit(main())
