"""Safe persistence: a checkpoint crafted to run code when unpickled is refused without
running it, and a save killed part-way leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers.learner import assert_identical, make_learner, snapshot
from mixprec import load_checkpoint, save_checkpoint

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}


class RunsCode:
    """Unpickling this calls exec, which writes `marker`: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _malicious(tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A Learner checkpoint whose `where` entry runs code when unpickled."""
    learn = make_learner(tmp_path).to_fp16()
    path = learn.save("evil")
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint[where] = {"payload": RunsCode(marker)}
    torch.save(checkpoint, path)
    return path, marker


@pytest.mark.parametrize("where", ["model", "rng"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, where):
    path, marker = _malicious(tmp_path, where)
    torch.load(path, weights_only=False)  # the file is a real exploit: a plain load runs it
    assert marker.read_text() == "code ran"
    marker.unlink()

    learn = make_learner(tmp_path, seed=3).to_fp16()
    learn.fit(1)
    before = snapshot(learn)
    message = r"evil.pth was refused, and nothing in it was run: loading it would call exec"
    with pytest.raises(ValueError, match=message):
        learn.load("evil")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)
    assert not marker.exists()
    assert_identical(snapshot(learn), before)


KILLED_MID_WRITE = """
import io, os, sys, time
import torch
from mixprec.core.checkpoint import save_checkpoint

real_save = torch.save

def half_then_hang(obj, f):  # writes half the bytes, says so, and waits to be killed
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("half written", flush=True)
    time.sleep(120)
    f.write(data[len(data) // 2 :])

newer = torch.load(sys.argv[1], weights_only=True)  # what learn.save would write next
torch.save = half_then_hang
save_checkpoint(newer, sys.argv[2])  # learn.save's writer
"""


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    learn = make_learner(tmp_path).to_fp16()
    learn.fit(1)
    path = learn.save("ckpt")
    saved_bytes, saved_state = path.read_bytes(), snapshot(learn)
    learn.fit(1)
    newer = learn.save("newer")  # the next save of "ckpt", written in another process
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_MID_WRITE), str(newer), str(path)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line == "half written\n", child.stderr.read() if child.poll() is not None else line
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    (partial,) = [p for p in path.parent.iterdir() if p not in (path, newer)]  # its temp file
    assert partial.name.startswith(".ckpt.pth.") and 0 < partial.stat().st_size < len(saved_bytes)
    assert path.read_bytes() == saved_bytes
    resumed = make_learner(tmp_path, seed=9).to_fp16().load("ckpt")
    assert_identical(snapshot(resumed), saved_state)
    with pytest.raises(ValueError, match="is truncated or corrupted"):
        load_checkpoint(partial)  # had a reader found the half-written file, it would be refused


SAVES_FOREVER = """
import sys
import torch
torch.set_num_threads(1)
from mixprec import save_checkpoint
for version in range(1, 10**6):
    save_checkpoint({"version": version, "w": torch.full((1 << 20,), float(version))}, sys.argv[1])
"""


def test_a_writer_killed_at_any_moment_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"version": 0, "w": torch.zeros(1 << 20)}, path)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SAVES_FOREVER), str(path)], env=ENV
    )
    try:
        deadline = time.monotonic() + 60
        while load_checkpoint(path)["version"] < 2:  # a few complete saves, then kill mid-loop
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    checkpoint = load_checkpoint(path)  # checksums verified: a complete file, never a mix
    assert checkpoint["version"] >= 2
    assert torch.equal(checkpoint["w"], torch.full((1 << 20,), float(checkpoint["version"])))
