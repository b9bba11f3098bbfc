"""Recorder: what it keeps, its state_dict, and its plot."""

import torch

from learner_helpers import make_learner
from mixprec import Recorder, plot_runs

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
