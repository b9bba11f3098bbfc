"""The two precision modes through the MixedPrecision callback and Learner.to_fp16(mode=...)."""

import json

import pytest
import torch

from helpers.learner import assert_identical, make_learner, master_of
from mixprec import AutocastOptimizer, Callback, MixedPrecision, MixedPrecisionOptimizer
from mixprec.cli.main import main

DYNAMIC = {"loss_scale": "dynamic", "init_scale": 2.0**20, "growth_interval": 3}  # skips, grows


class AutocastSpy(Callback):
    """Records, at each event, whether autocast is on, and the output dtype the loss gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.output_dtypes: list[torch.dtype] = []

    def on_loss_begin(self, last_output, **kwargs):
        self.seen.append(("on_loss_begin", torch.is_autocast_enabled("cpu")))
        self.output_dtypes.append(last_output.dtype)

    def on_backward_begin(self, **kwargs):
        self.seen.append(("on_backward_begin", torch.is_autocast_enabled("cpu")))

    def on_step_end(self, **kwargs):
        self.seen.append(("on_step_end", torch.is_autocast_enabled("cpu")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_mode_keeps_the_model_fp32_and_autocasts_forward_and_loss(tmp_path, dtype):
    learn = make_learner(tmp_path).to_fp16(mode="autocast", dtype=dtype)
    spy = AutocastSpy()
    learn.add_cb(spy)
    forwards: list[bool] = []
    learn.model.register_forward_hook(lambda *_: forwards.append(torch.is_autocast_enabled("cpu")))
    assert isinstance(learn.opt, AutocastOptimizer) and learn.opt.dtype == dtype
    assert learn.opt.fused  # AdamW: torch's fused kernel, by default
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1)
    assert not all(torch.equal(a, p) for a, p in zip(before, learn.model.parameters()))
    assert learn.data.tfms == []  # inputs stay fp32: autocast casts them op by op
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    assert set(spy.seen) == {("on_loss_begin", True), ("on_backward_begin", False),
                             ("on_step_end", False)}  # fmt: skip
    assert set(spy.output_dtypes) == {dtype}  # the last Linear ran in half
    n = len(learn.data.train_dl)
    assert len(forwards) > n and all(forwards)  # training and validation under autocast
    assert not torch.is_autocast_enabled("cpu")
    assert "mode='autocast', master='fp32')" in repr(learn.mixed_precision)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_modes_train_this_model_alike(tmp_path, dtype):
    """A Linear/BatchNorm model rounds the same way in both modes: half weights (the master's
    rounding, or autocast's cast of the fp32 weight), half matmuls, fp32 norm statistics,
    fp32 updates. So the fp32 weights agree, through skipped and grown steps alike."""
    runs = {}
    for mode in ("master", "autocast"):
        learn = make_learner(tmp_path).to_fp16(mode=mode, dtype=dtype, **DYNAMIC)
        learn.fit(2, lr=1e-2)
        runs[mode] = learn
    master, auto = runs["master"], runs["autocast"]
    for p, q in zip(master.model.parameters(), auto.model.parameters()):
        torch.testing.assert_close(master_of(master, p), q, rtol=1e-3, atol=1e-4)
    assert master.recorder.skipped == auto.recorder.skipped
    assert master.opt.loss_scale == auto.opt.loss_scale
    if dtype == torch.float16:
        assert auto.opt.skipped_steps > 0  # 2**20 overflows fp16 at first
    torch.testing.assert_close(master.validate(), auto.validate(), rtol=1e-2, atol=1e-3)


class Cancel(Exception):
    """Stands for a callback cancelling the batch."""


class CancelMidForward(Callback):
    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_loss_begin(self, iteration, **kwargs):
        if iteration == self.at_batch:
            raise Cancel("batch cancelled")


def test_a_cancelled_batch_cannot_leave_autocast_on(tmp_path):
    learn = make_learner(tmp_path).to_fp16(mode="autocast", dtype=torch.bfloat16)
    learn.add_cb(CancelMidForward(at_batch=2))
    with pytest.raises(Cancel, match="batch cancelled"):
        learn.fit(1)
    assert not torch.is_autocast_enabled("cpu")
    learn.callbacks = [cb for cb in learn.callbacks if not isinstance(cb, CancelMidForward)]

    def broken_forward(module, args):
        raise KeyboardInterrupt

    handle = learn.model[2].register_forward_pre_hook(broken_forward)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1)
    assert not torch.is_autocast_enabled("cpu")
    handle.remove()
    learn.fit(1)  # and training goes on
    assert not torch.is_autocast_enabled("cpu")


def test_contradictory_options_are_refused_echoing_the_call(tmp_path):
    learn = make_learner(tmp_path)
    with pytest.raises(ValueError, match=r"MixedPrecision\(mode='autocast', flat_master=True\)"):
        learn.to_fp16(mode="autocast", flat_master=True)
    with pytest.raises(
        ValueError, match=r"\(mode='autocast', flat_master=True\): flat_master lays"
    ):
        MixedPrecision(learn, flat_master=True, mode="autocast", fused=True)
    with pytest.raises(ValueError, match="fused=True cannot be used: the fused step implements"):
        make_learner(tmp_path, opt_func=torch.optim.SGD).to_fp16(mode="autocast", fused=True)
    with pytest.raises(ValueError, match="mode must be one of 'master', 'autocast'; got 'amp'"):
        learn.to_fp16(mode="amp")
    with pytest.raises(TypeError, match="mode must be a string"):
        learn.to_fp16(mode=None)
    assert learn.mixed_precision is None and learn.model[0].weight.dtype == torch.float32


def test_autocast_checkpoints_resume_exactly(tmp_path):
    straight = make_learner(tmp_path).to_fp16(mode="autocast", **DYNAMIC)
    straight.fit(2, lr=1e-2)
    first = make_learner(tmp_path).to_fp16(mode="autocast", **DYNAMIC)
    first.fit(1, lr=1e-2)
    first.save("one")
    resumed = make_learner(tmp_path, seed=1).to_fp16(mode="autocast", **DYNAMIC)
    resumed.load("one")
    resumed.fit(1, lr=1e-2)
    assert_identical(resumed.model.state_dict(), straight.model.state_dict(), "model")
    assert_identical(resumed.opt.state_dict(), straight.opt.state_dict(), "opt")
    assert straight.opt.skipped_steps > 0


@pytest.mark.parametrize("saved_in, loaded_in", [("master", "autocast"), ("autocast", "master")])
def test_a_checkpoint_of_one_mode_is_refused_by_the_other(tmp_path, saved_in, loaded_in):
    saver = make_learner(tmp_path).to_fp16(mode=saved_in)
    saver.fit(1)
    saver.save("ckpt")
    loader = make_learner(tmp_path, seed=1).to_fp16(mode=loaded_in)
    before = {k: v.clone() for k, v in loader.model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=rf"saved in mode='{saved_in}' .* loaded in mode='{loaded_in}'.*learn\.to_fp32\(\)",
    ):
        loader.load("ckpt")
    assert_identical(loader.model.state_dict(), before, "model untouched")


def test_to_fp32_from_autocast_keeps_the_optimizer_and_its_state(tmp_path):
    learn = make_learner(tmp_path).to_fp16(mode="autocast")
    learn.fit(1)
    inner = learn.opt.optimizer
    state = {id(p): s["exp_avg"].clone() for p, s in inner.state.items()}
    learn.to_fp32()
    assert learn.opt is inner and learn.mixed_precision is None
    assert {id(p): s["exp_avg"] for p, s in inner.state.items()}.keys() == state.keys()
    learn.fit(1)  # fp32 from here
    learn.to_fp16(mode="master")  # and the other mode takes the same optimizer over
    assert isinstance(learn.opt, MixedPrecisionOptimizer) and learn.opt.optimizer is inner
    learn.fit(1)


def test_mixprec_train_takes_a_mode(capsys):
    args = ["train", "--epochs", "1", "--precisions", "bf16", "--mode", "autocast", "--json"]
    assert main(args) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["mode"] == "autocast" and 0.5 < run["accuracy"] <= 1.0
