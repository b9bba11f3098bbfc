"""Start a command on 2 local processes with the environment torchrun gives each (gloo over
127.0.0.1), as test_distributed_e2e.py does, and collect what each printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mixprec

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout: float = 180) -> list[tuple[str, str]]:
    """Run `python *args` as rank 0 and rank 1 at once; return each rank's (stdout, stderr).
    Fails the test, with both ranks' output, if either exits with an error."""
    src = str(Path(mixprec.__file__).resolve().parents[1])  # the mixprec under test
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        "LOCAL_WORLD_SIZE": str(WORLD_SIZE),
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
        for rank in range(WORLD_SIZE)
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
