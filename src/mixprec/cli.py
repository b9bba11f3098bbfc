"""The `mixprec` command: one subcommand per module, each with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mixprec.demo.train", "train the digits CNN in fp32, fp16 and bf16 and compare"),
    "diagnose": (
        "mixprec.experiments.diagnose_command",
        "histogram a demo model's gradients against the fp16 and bf16 ranges",
    ),
    "experiment": (
        "mixprec.experiments.command",
        "reproduce the mixed-precision paper's claims: parity, underflow",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; return its exit status."""
    parser = argparse.ArgumentParser(prog="mixprec", description="Mixed-precision training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Arguments are added lazily below, so importing one command never costs the others.
    args, _ = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    command_parser = argparse.ArgumentParser(
        prog=f"mixprec {args.command}", description=COMMANDS[args.command][1]
    )
    module.add_arguments(command_parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return int(module.run(command_parser.parse_args(argv[argv.index(args.command) + 1 :])) or 0)


if __name__ == "__main__":
    sys.exit(main())
