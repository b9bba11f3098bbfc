"""The `mixprec` command writing into a pipe whose reader has gone (`mixprec ... | head -c 10`):
it stops quietly with the status of a command killed by SIGPIPE, every subcommand alike."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mixprec
from mixprec import cli

SRC = str(Path(mixprec.__file__).resolve().parents[1])


@pytest.mark.parametrize(
    "argv", [["plan", "digits-cnn", "--json"], ["diagnose", "--tiny", "--json"]], ids=" ".join
)
def test_a_closed_pipe_ends_the_command_quietly(argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write fails
    env = {**os.environ, "PYTHONPATH": SRC}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mixprec", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 128 + signal.SIGPIPE  # as a shell reports a command SIGPIPE killed


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch, capfd):
    def run(args):
        raise BrokenPipeError(32, "a worker's pipe")

    monkeypatch.setattr("mixprec.cli.plan_command.run", run)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        cli.main(["plan", "digits-cnn"])
