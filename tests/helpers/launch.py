"""Start a command on 2 local processes with the environment torchrun gives each (gloo over
127.0.0.1), and collect what each printed or saved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import mixprec

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    args: list[str], timeout: float = 180, world_size: int = WORLD_SIZE
) -> list[tuple[str, str]]:
    """Run `python *args` on `world_size` ranks at once; return each rank's (stdout, stderr).
    Fails the test, with every rank's output, if any exits with an error."""
    src = str(Path(mixprec.__file__).resolve().parents[1])  # the mixprec under test
    tests = str(Path(__file__).resolve().parents[1])  # the workers import tests/helpers
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, tests, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform.startswith("linux"):
        base["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail(
            "a rank failed:\n"
            + "\n".join(
                f"--- rank {r}\n{out[-2000:]}\n{err[-3000:]}"
                for r, (out, err) in enumerate(outputs)
            )
        )
    return outputs


def launch(worker: Path, out: Path, world_size: int = WORLD_SIZE) -> list[dict[str, Any]]:
    """Run `python worker OUT` on `world_size` ranks; return each rank's OUT/rank{r}.pt."""
    run_ranks([str(worker), str(out)], world_size=world_size)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
