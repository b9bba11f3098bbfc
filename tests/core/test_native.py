"""Building and loading the native kernels, and running without them."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from mixprec.core import native


@pytest.fixture
def fresh_library(monkeypatch):
    """library() asked again under the test's conditions, then again as the session had it."""
    native.library.cache_clear()
    yield
    monkeypatch.undo()
    native.library.cache_clear()
    native.library()


def test_turned_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("MIXPREC_NATIVE", "0")
    assert native.library() is None
    assert "MIXPREC_NATIVE=0" in native.unavailable_reason()


def test_without_a_compiler(fresh_library, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert "no C compiler" in native.unavailable_reason()


def test_a_failed_build_is_reported_and_leaves_no_library(fresh_library, monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: no space left' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(native, "_compiler", lambda: str(failing))
    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path / "cache"))
    assert native.library() is None
    assert "no space left" in native.unavailable_reason()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library


def test_a_build_lands_in_the_cache_dir_once(fresh_library, monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path))
    lib = native.library()
    assert lib is not None and native.unavailable_reason() is None
    (built,) = tmp_path.iterdir()
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == [stamp]  # loaded, not rebuilt


def test_a_process_without_native_kernels_steps_to_the_same_numbers(tmp_path):
    """MIXPREC_NATIVE=0 in a fresh process: torch's kernels, the same masters bit for bit."""
    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from mixprec import MixedPrecisionOptimizer\n"
        "from mixprec.core import native\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        "m = nn.Linear(32, 32)\n"
        "opt = MixedPrecisionOptimizer(torch.optim.AdamW(m.parameters(), weight_decay=0.1),"
        " model=m, dtype=torch.bfloat16)\n"
        "for i in range(3):\n"
        "    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(i)).bfloat16()\n"
        "    opt.backward(m(x).float().square().mean()); opt.step(); opt.zero_grad()\n"
        "print(native.library() is not None)\n"
        "torch.save([v.clone() for v in opt.master_values().values()], sys.argv[1])\n"
    )
    runs = []
    for flag in ("1", "0"):
        out = tmp_path / f"masters{flag}.pt"
        env = {**os.environ, "MIXPREC_NATIVE": flag}
        done = subprocess.run(
            [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        runs.append((done.stdout.strip(), torch.load(out)))
    (used_on, on), (used_off, off) = runs
    assert used_on == str(native.library() is not None)
    assert used_off == "False"
    for a, b in zip(on, off):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_cpu_scalar_reads_one_fp32_value_and_refuses_anything_else():
    assert native.cpu_scalar(torch.tensor([2.5])) == 2.5
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([1.0], dtype=torch.float64)):
        with pytest.raises(ValueError, match="expected a one-element fp32 CPU tensor"):
            native.cpu_scalar(bad)


def test_run_split_covers_every_element_once_in_aligned_ranges(monkeypatch):
    monkeypatch.setattr(native, "PARALLEL_MIN", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen: list[tuple[int, int]] = []
        native.run_split(lambda a, b: seen.append((a, b)), 64 * 100 + 64)
        small: list[tuple[int, int]] = []
        native.run_split(lambda a, b: small.append((a, b)), 63)
    finally:
        torch.set_num_threads(before)
    ranges = sorted(seen)
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 6464
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(a % 64 == 0 for a, _ in ranges)
    assert small == [(0, 63)]  # below PARALLEL_MIN: one call in this thread


def test_step_counters_advance_as_torchs_foreach_add_does():
    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    values = [0.0, 1.0, 41.0, 2.0**24 - 1, 2.0**24, 2.0**24 + 2, 3.5e38]
    ours = [torch.tensor(v) for v in values]
    theirs = [t.clone() for t in ours]
    counters = native.StepCounters(ours)
    for _ in range(3):
        counters.advance()
        torch._foreach_add_(theirs, 1)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert native.StepCounters.possible(ours)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor(1.0, dtype=torch.float64)):
        assert not native.StepCounters.possible([ours[0], bad])
        with pytest.raises(ValueError, match="expected a one-element fp32 CPU tensor"):
            native.StepCounters([ours[0], bad])
