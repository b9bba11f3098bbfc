"""Learner-side scenarios a fastai-v1 user hits: events under exceptions, half models outside
fit, metrics and checkpoints."""

from __future__ import annotations

import pytest
import torch

from learner_helpers import make_learner
from mixprec import Callback


class FailingTrainEnd(Callback):
    """An on_train_end that raises, as a callback saving a file to a full disk would."""

    def on_train_end(self, **kwargs):
        raise RuntimeError("disk full")


def test_on_train_end_of_every_callback_runs_when_one_raises(tmp_path):
    learn = make_learner(tmp_path, callbacks=[FailingTrainEnd()]).to_fp16()
    with pytest.raises(RuntimeError, match="disk full"):
        learn.fit(1)
    assert learn.data.tfms == []  # MixedPrecision still removed its input transform
    x, _ = next(iter(learn.data.train_dl))
    assert x.dtype == torch.float32


def test_validate_weights_batches_by_sample_count_with_tuple_targets(tmp_path):
    """A multi-task target `(y1, y2)`: the partial last batch must weigh its samples, not 2."""
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from mixprec import DataBunch, Learner

    torch.manual_seed(0)
    x, y = torch.randn(20, 8), torch.randint(0, 4, (20,))

    class TwoTargets(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return x[i], (y[i], y[i])

    dl = DataLoader(TwoTargets(), batch_size=16)  # batches of 16 and 4
    model = nn.Linear(8, 4)
    learn = Learner(
        DataBunch(dl, dl, device="cpu"),
        model,
        loss_func=lambda out, target: nn.functional.cross_entropy(out, target[0]),
        progress=False,
    )
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert learn.validate()[0] == pytest.approx(expected, rel=1e-5)


def test_fit_runs_on_a_loader_without_len(tmp_path):
    """A DataLoader over an IterableDataset (streamed data) has no len()."""
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset

    from mixprec import DataBunch, Learner

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(16):
                x = torch.randn(8, generator=g)
                yield x, (x[0] > 0).long()

    dl = DataLoader(Stream(), batch_size=8)
    data = DataBunch(dl, dl, device="cpu")
    learn = Learner(data, nn.Linear(8, 2), path=tmp_path, progress=True).to_fp16()
    learn.fit(1)
    assert len(learn.recorder.losses) == 2 and len(learn.recorder.val_losses) == 1
    assert "train=None batches" in repr(data)


def test_to_device_keeps_packed_sequence_batch_sizes_on_the_cpu():
    """PackedSequence batches (RNN text models) moved to an accelerator: batch_sizes must
    stay on the CPU. The meta device stands in for a GPU."""
    from torch.nn.utils.rnn import PackedSequence, pack_sequence

    from mixprec.learner.data import to_device

    packed = pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    moved = to_device({"x": packed}, torch.device("meta"))["x"]
    assert isinstance(moved, PackedSequence)
    assert moved.data.device.type == "meta" and moved.batch_sizes.device.type == "cpu"


def test_metrics_and_callbacks_are_checked_when_the_learner_is_built(tmp_path):
    """fastai v1 takes one metric or callback as well as a list; a non-callable metric is
    refused at once, not after a whole epoch of training."""
    from learner_helpers import tiny_data, tiny_model
    from mixprec import Learner, accuracy

    learn = Learner(tiny_data(), tiny_model(), metrics=accuracy, callbacks=FailingTrainEnd())
    assert learn.metrics == [accuracy] and isinstance(learn.callbacks[0], FailingTrainEnd)
    with pytest.raises(TypeError, match="metrics must be callables"):
        Learner(tiny_data(), tiny_model(), metrics=[accuracy, "accuracy"])


class UnusedLayer(torch.nn.Module):
    """A layer that never gets a gradient, so a fp32 fit leaves it without optimizer state."""

    def __init__(self):
        super().__init__()
        self.a, self.unused = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x)


def test_a_refused_to_fp16_leaves_the_fp32_weights_exact(tmp_path):
    """flat_master=True cannot merge the state of a fp32 fit where a layer had no grad: the
    refusal must not leave a half model whose rounded weights a retry would take as masters."""
    from learner_helpers import tiny_data
    from mixprec import Learner

    torch.manual_seed(0)
    learn = Learner(tiny_data(), UnusedLayer(), path=tmp_path, progress=False)
    learn.fit(1)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="cannot be merged into one flat master"):
        learn.to_fp16(flat_master=True)
    for p, b in zip(learn.model.parameters(), before):
        assert p.dtype == torch.float32 and torch.equal(p, b)
    learn.fit(1)  # still an fp32 learner
    before = {id(p): p.detach().clone() for p in learn.model.parameters()}
    learn.to_fp16()
    opt = learn.opt
    pairs = [(p, m) for ps, ms in zip(opt.model_params, opt.master_params) for p, m in zip(ps, ms)]
    assert len(pairs) == len(before)
    assert all(torch.equal(m.detach(), before[id(p)]) for p, m in pairs)


@pytest.mark.parametrize("flat_master", [False, True])
def test_create_opt_after_to_fp16_keeps_the_fp32_masters(tmp_path, flat_master):
    """A fresh optimizer (learn.create_opt(), as fastai v1 users reset it) is wrapped with
    the masters the old one had, never rebuilt from the rounded half weights."""
    from mixprec.learner.mixed_precision import _master_views

    def masters(opt):
        return {
            id(p): v.clone()
            for ps, ms in zip(opt.model_params, opt.master_params)
            if ps
            for p, v in zip(ps, _master_views(ps, ms, flat_master))
        }

    learn = make_learner(tmp_path).to_fp16(flat_master=flat_master)
    learn.fit(1)
    before = masters(learn.opt)
    learn.create_opt()
    learn.save("reset")  # wraps the new optimizer (as fit would), without stepping it
    after = masters(learn.opt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_to_fp32_after_create_opt_gives_the_model_the_fp32_masters(tmp_path):
    from mixprec.learner.mixed_precision import _masters_by_param

    learn = make_learner(tmp_path).to_fp16()
    learn.fit(1)
    masters = _masters_by_param(learn.opt)
    learn.create_opt()  # a plain optimizer over the half model; the callback has the masters
    learn.to_fp32()
    for p in learn.model.parameters():
        assert p.dtype == torch.float32 and torch.equal(p, masters[id(p)])
