"""Safe persistence: a checkpoint crafted to run code when unpickled is refused without
running it, and a save killed part-way leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import mixprec.core.checkpoint
from helpers.learner import assert_identical, make_learner, snapshot
from mixprec import load_checkpoint, save_checkpoint
from mixprec.core.integrity import CheckpointError

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
    message = (
        r"evil.pth was refused as unsafe, and nothing in it was run: loading it would call exec"
    )
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


class CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_calling_os_system_is_refused_as_unsafe_without_advice_to_turn_checks_off(
    tmp_path,
):
    path = tmp_path / "system.pth"
    torch.save({"x": CallsSystem()}, path)
    with pytest.raises(
        CheckpointError, match=r"system.pth was refused as unsafe.*call posix.system"
    ) as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)


def _patched_zip(data: bytes, flags: int = 0, method: int | None = None) -> bytes:
    """The archive with its first member's header flags or compression method changed."""
    out = bytearray(data)
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = out.index(signature)
        old = struct.unpack_from("<H", out, at + flag_at)[0]
        struct.pack_into("<H", out, at + flag_at, old | flags)
        if method is not None:
            struct.pack_into("<H", out, at + method_at, method)
    return bytes(out)


DAMAGED = {
    "unknown compression method": lambda b: _patched_zip(b, method=99),
    "encrypted member": lambda b: _patched_zip(b, flags=0x1),
    "stored bytes read as deflate": lambda b: _patched_zip(b, method=8),
    "central directory cut": lambda b: b[: b.rindex(b"PK\x01\x02")] + b"PK\x05\x06" + bytes(18),
}


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_every_damaged_archive_is_one_checkpoint_error_naming_the_file(tmp_path, damage):
    path = save_checkpoint({"w": torch.arange(64.0)}, tmp_path / "good.pth")
    bad = tmp_path / "damaged.pth"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"damaged.pth is (truncated or )?corrupted"):
        load_checkpoint(bad)


def test_a_long_name_saves_though_the_temporary_name_would_be_longer(tmp_path):
    learn = make_learner(tmp_path)
    name = "n" * 240  # "{name}.pth" is 244 bytes: a valid file name
    path = learn.save(name)
    assert path.name == name + ".pth" and path.is_file()
    assert list(path.parent.iterdir()) == [path]
    learn.load(name)


def test_a_full_disk_says_so_and_leaves_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "ckpt.pth")
    good = path.read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 512:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        mixprec.core.checkpoint, "open", lambda p, m: Full(real_open(p, m)), raising=False
    )
    with pytest.raises(
        OSError,
        match=r"no space left on the device writing .*ckpt.pth .* the previous file there is intact",
    ) as caught:
        save_checkpoint({"w": torch.ones(100_000)}, path)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == good
    assert list(tmp_path.iterdir()) == [path]


def test_stale_temporary_files_of_killed_saves_are_cleaned_on_the_next_save(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    host = mixprec.core.checkpoint._host()
    other = "0badc0de" if host != "0badc0de" else "0badc0df"
    files = {
        "dead writer": f".ckpt.pth.{host}-{dead_pid}-{'a' * 12}.mixprec.tmp",
        "live writer": f".ckpt.pth.{host}-{os.getpid()}-{'b' * 12}.mixprec.tmp",
        "other host, recent": f".ckpt.pth.{other}-{dead_pid}-{'c' * 12}.mixprec.tmp",
        "other host, old": f".ckpt.pth.{other}-{dead_pid}-{'d' * 12}.mixprec.tmp",
        "an older version's": f".ckpt.pth.{dead_pid}.{'e' * 32}.tmp",
        "not ours": ".notes.tmp",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    for key in ("other host, old", "an older version's"):
        os.utime(tmp_path / files[key], (two_days_ago, two_days_ago))
    save_checkpoint({"w": torch.zeros(3)}, tmp_path / "ckpt.pth")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {
        "ckpt.pth",
        files["live writer"],
        files["other host, recent"],
        files["not ours"],
    }
