"""Recorder: what it keeps, its state_dict, and its plot."""

import torch

from helpers.dispatch import OpRecorder
from helpers.learner import make_learner, tiny_data
from mixprec import Recorder
from mixprec.learner.recorder import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_recorder_keeps_steps_and_epochs_across_fits(tmp_path):
    learn = make_learner(tmp_path).to_fp16("dynamic", init_scale=2.0**20)
    learn.fit(1, lr=1e-2)
    learn.fit(1, lr=2e-2)
    rec, n = learn.recorder, len(learn.data.train_dl)
    assert len(rec.losses) == len(rec.loss_scales) == len(rec.skipped) == 2 * n
    assert rec.lrs == [1e-2] * n + [2e-2] * n
    assert rec.epoch_ends == [n, 2 * n] and len(rec.val_losses) == 2
    assert rec.metrics[-1] == [learn.validate()[1]]
    assert rec.loss_scales[-1] == learn.opt.loss_scale
    assert rec.skipped_steps == learn.opt.skipped_steps > 0  # 2**20 overflows fp16 at first
    copy = Recorder()
    copy.load_state_dict({**rec.state_dict(), "from_a_newer_version": 1})
    assert copy.state_dict() == rec.state_dict()


def test_plot_writes_a_png_of_loss_and_loss_scale(tmp_path):
    mixed = make_learner(tmp_path).to_fp16("dynamic", init_scale=2.0**20)
    mixed.fit(1)
    path = mixed.recorder.plot(tmp_path / "plots" / "one.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    fp32 = make_learner(tmp_path)
    fp32.fit(1)
    both = plot_runs({"fp32": fp32.recorder, "fp16": mixed.recorder}, tmp_path / "two.png")
    assert both.read_bytes().startswith(PNG_MAGIC) and both.stat().st_size > 10_000
    assert torch.isfinite(torch.tensor(fp32.recorder.losses)).all()


def _syncs_of_one_epoch(tmp_path, monkeypatch, batches: int) -> int:
    """Host syncs of `fit(1)` (validation included) of an fp16 learner over `batches` steps:
    reads of one value (`.item()`, `float()`, `bool()`) and whole-tensor reads (`.tolist()`...)."""
    learn = make_learner(tmp_path, opt_func=torch.optim.SGD).to_fp16()  # SGD: no CPU .item()
    learn.data = tiny_data(n=16 * batches)
    reads = []
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda t, *a, _o=original, **k: reads.append(1) or _o(t, *a, **k)
        )
    with OpRecorder() as ops:
        learn.fit(1)
    monkeypatch.undo()
    assert learn.recorder.steps == batches
    return ops.host_syncs + len(reads)


def test_a_learner_step_costs_one_host_sync_the_engines(tmp_path, monkeypatch):
    four, eight = (_syncs_of_one_epoch(tmp_path, monkeypatch, n) for n in (4, 8))
    assert eight - four == 4  # per step: the overflow flag only, the loss stays on the device
    # per epoch: the losses read back, validation's one read, and the loaders' reads of their
    # host-side seeds and permutations (5 in torch 2.13; no device sync on a GPU)
    assert four - 4 <= 7


def test_losses_read_back_when_read_and_the_history_survives_a_state_dict(tmp_path):
    learn = make_learner(tmp_path).to_fp16()
    learn.fit(1)
    rec = learn.recorder
    rec.on_batch_end(learn, torch.tensor(0.25), step_applied=False)
    assert rec.steps == 5 and len(rec._pending) == 1  # kept on the device, not read yet
    assert rec.losses[-1] == 0.25 and rec._pending == []
    rec.on_batch_end(learn, torch.tensor(0.5, dtype=torch.float16))
    state = rec.state_dict()
    assert state["losses"][-2:] == [0.25, 0.5] and list(state) == list(Recorder().state_dict())
    copy = Recorder()
    copy.load_state_dict(state)
    assert copy.losses == rec.losses and copy.steps == 6 and repr(copy) == repr(rec)
