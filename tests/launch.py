"""Start a worker script on 2 processes of a gloo group, as torchrun would start them (RANK,
WORLD_SIZE, MASTER_ADDR, ... in the environment), and collect each rank's results."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Path, out: Path, world_size: int = WORLD_SIZE) -> list[dict[str, Any]]:
    """Run `python worker OUT` on `world_size` ranks; return each rank's OUT/rank{r}.pt."""
    src = str(Path(mixprec.__file__).resolve().parents[1])  # the mixprec under test
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform.startswith("linux"):
        base["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail(
            "a worker failed:\n"
            + "\n".join(f"--- rank {r}\n{log[-3000:]}" for r, log in enumerate(logs))
        )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
