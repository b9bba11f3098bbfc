"""Learner.save / load: contents, atomic writes, safe loads and exact resume in a fresh process."""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mixprec.core.checkpoint
from helpers.learner import assert_identical, make_learner, master_of, snapshot, tiny_model
from mixprec.core.checkpoint import rng_state, save_checkpoint, set_rng_state

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
DYNAMIC = {"loss_scale": "dynamic", "init_scale": 2.0**20, "growth_interval": 3}
# (name, to_fp16 options or None for fp32): the configurations the resume test covers
CONFIGS = [("fp32", None), ("fp16", DYNAMIC), ("fp16_flat", {**DYNAMIC, "flat_master": True})]

RESUME = """
import sys
import torch
torch.set_num_threads(1)
from helpers.learner import make_learner
from core.test_checkpoint import CONFIGS
for name, options in CONFIGS:
    learn = make_learner(sys.argv[1], seed=123)  # another init: load must replace it
    if options is not None:
        learn.to_fp16(**options)
    learn.load(name + "_epoch1").fit(1)
    learn.save(name + "_resumed")
"""


def _learner(path, options):
    learn = make_learner(path)
    return learn if options is None else learn.to_fp16(**options)


@pytest.mark.parametrize("flat_master", [False, True])
def test_save_writes_the_masters_once_under_parameter_names(tmp_path, flat_master):
    learn = _learner(tmp_path, {**DYNAMIC, "flat_master": flat_master})
    learn.fit(1)
    path = learn.save("ckpt")
    assert path == tmp_path / "models" / "ckpt.pth" and path.is_file()
    ckpt = torch.load(path, weights_only=True)
    opt = learn.opt
    assert "masters" not in ckpt["opt"]  # the weights are stored once, in "model"
    for name, p in learn.model.named_parameters():
        assert ckpt["model"][name].dtype == torch.float32
        assert_identical(ckpt["model"][name], master_of(learn, p), name)
    assert ckpt["opt"]["scaler"] == opt.scaler.state_dict()
    assert ckpt["opt"]["optimizer"]["state"]  # AdamW moments of the masters
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, len(learn.data.train_dl))
    assert ckpt["mixed_precision"] is True
    assert list(tmp_path.joinpath("models").iterdir()) == [path]  # no temporary file left
    fp32 = tiny_model()  # for inference or export: takes the exact fp32 weights as they are
    fp32.load_state_dict(ckpt["model"])
    for name, p in fp32.named_parameters():
        assert_identical(p.detach(), master_of(learn, learn.model.get_parameter(name)), name)
    # not stored twice: fp32 masters and two AdamW moments, no other copy of the weights
    n = sum(p.numel() for p in learn.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in learn.model.buffers())
    assert _stored_bytes([ckpt["model"], ckpt["opt"]]) - buffers <= 4 * 3 * n + 4 * 16


def _stored_bytes(obj) -> int:
    """Bytes of the distinct storages of the tensors in a nested structure."""
    seen = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(seen.values())


def test_saving_is_atomic(tmp_path, monkeypatch):
    learn = make_learner(tmp_path)
    path = learn.save("ckpt")
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(mixprec.core.checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        learn.save("ckpt")
    assert path.read_bytes() == good
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_an_oserror_with_its_errno_and_the_previous_file_stays(
    tmp_path, monkeypatch, code
):
    path = save_checkpoint({"w": torch.zeros(10)}, tmp_path / "ckpt.pth")
    good = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mixprec.core.checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="the previous file there is intact") as caught:
        save_checkpoint({"w": torch.ones(10)}, path)
    assert caught.value.errno == code and not isinstance(caught.value, ValueError)
    assert f"no space left on the device writing {path}" in str(caught.value)
    assert path.read_bytes() == good
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_write_torch_reports_as_a_runtime_error_is_the_oserror_under_it(
    tmp_path, monkeypatch
):
    path = save_checkpoint({"w": torch.zeros(10)}, tmp_path / "ckpt.pth")
    good = path.read_bytes()
    real_open = open

    class Failing:  # a file whose writes fail with EIO once 512 bytes are written
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 512:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(
        mixprec.core.checkpoint, "open", lambda p, m: Failing(real_open(p, m)), raising=False
    )
    with pytest.raises(OSError, match=f"could not write {path}.*previous file there is intact"):
        save_checkpoint({"w": torch.ones(100_000)}, path)
    assert path.read_bytes() == good
    assert list(tmp_path.iterdir()) == [path]


def test_two_epochs_equal_one_then_save_load_in_a_fresh_process_then_one(tmp_path):
    straight = {}
    for name, options in CONFIGS:
        learn = _learner(tmp_path, options)
        learn.fit(2)
        straight[name] = snapshot(learn)
        learn = _learner(tmp_path, options)
        learn.fit(1)
        learn.save(f"{name}_epoch1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RESUME), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name, options in CONFIGS:
        learn = make_learner(tmp_path, seed=7)
        if options is not None:
            learn.to_fp16(**options)
        learn.load(f"{name}_resumed")
        assert_identical(snapshot(learn), straight[name], name)
        assert learn.iteration == 2 * len(learn.data.train_dl) and learn.epoch == 2


def test_load_refuses_a_checkpoint_of_the_other_precision(tmp_path):
    _learner(tmp_path, DYNAMIC).save("mixed")
    with pytest.raises(ValueError, match=r"saved in mixed precision; call learn\.to_fp16"):
        make_learner(tmp_path).load("mixed")
    make_learner(tmp_path).save("fp32")
    with pytest.raises(ValueError, match=r"saved in fp32; call learn\.to_fp32\(\)"):
        make_learner(tmp_path).to_fp16().load("fp32")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        make_learner(tmp_path).load("missing")


def test_rng_state_round_trips_with_loader_generators():
    g = torch.Generator().manual_seed(1)
    state = rng_state([g])
    first = torch.rand(3), torch.rand(2, generator=g)
    set_rng_state(state, [g])
    assert_identical((torch.rand(3), torch.rand(2, generator=g)), first)
    with pytest.raises(ValueError, match="holds 1 data-loader generator states"):
        set_rng_state(state, [])
