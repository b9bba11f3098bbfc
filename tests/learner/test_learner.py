"""Learner in fp32: fit, validate, param groups and weight decay, freezing, arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers.learner import assert_identical, make_learner, snapshot
from mixprec import Callback, DataBunch, Learner
from mixprec.learner.model_output import model_loss


def test_fit_trains_and_counts(tmp_path):
    learn = make_learner(tmp_path)
    before = snapshot(learn)
    learn.fit(1, lr=1e-2)
    n = len(learn.data.train_dl)
    assert (learn.epoch, learn.iteration) == (1, n)
    assert isinstance(learn.opt, torch.optim.AdamW)  # the default opt_func
    assert all(g["lr"] == 1e-2 for g in learn.opt.param_groups)
    assert not torch.equal(learn.model[0].weight, before["model"]["0.weight"])
    rec = learn.recorder
    assert len(rec.losses) == len(rec.lrs) == len(rec.skipped) == n
    assert rec.loss_scales == [None] * n and rec.skipped_steps == 0
    assert len(rec.val_losses) == len(rec.metrics) == 1


def test_validate_returns_the_loss_and_metrics_averaged_over_samples(tmp_path):
    learn = make_learner(tmp_path)
    x, y = learn.data.valid_dl.dl.dataset.tensors
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(x)
    loss, acc = learn.validate()
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert acc == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert learn.model.training is False  # the mode it had is restored
    assert torch.equal(learn.predict(x), out)


def test_fit_1_validate_fit_1_equals_fit_2(tmp_path):
    a = make_learner(tmp_path)  # seeds the model and the shuffling RNG
    a.fit(1)
    a.validate()  # draws nothing from the RNG that shuffles the next epoch
    a.fit(1)
    b = make_learner(tmp_path)
    b.fit(2)
    assert_identical(snapshot(a), snapshot(b))
    assert a.recorder.losses == b.recorder.losses


def test_norm_and_bias_parameters_get_no_weight_decay(tmp_path):
    learn = make_learner(tmp_path)
    model = learn.model
    groups = learn.param_groups()
    assert [g["params"] for g in groups] == [
        [model[0].weight, model[3].weight],
        [model[0].bias, model[3].bias],
        [model[1].weight, model[1].bias],
    ]
    opt = learn.create_opt()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.0]  # AdamW's 0.01
    opt = make_learner(tmp_path, wd=0.1, bn_wd=True).create_opt()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.1]


def test_freeze_keeps_norm_layers_trainable_and_frozen_weights_fixed(tmp_path):
    learn = make_learner(tmp_path, layer_groups=True)
    model = learn.model
    learn.freeze()
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert model[1].weight.requires_grad and model[3].weight.requires_grad
    frozen = model[0].weight.clone()
    learn.fit(1)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in learn.opt.state  # never stepped: no moments
    learn.freeze_to(2)
    assert not model[3].weight.requires_grad and model[1].weight.requires_grad
    learn.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="n must be an int"):
        learn.freeze_to(1.0)


def test_layer_groups_default_to_the_model_and_shared_parameters_count_once(tmp_path):
    learn = make_learner(tmp_path)
    assert learn.layer_groups == [learn.model]
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    learn = Learner(learn.data, model, layer_groups=[model[:1], model[1:]], progress=False)
    groups = learn.param_groups()
    assert groups[0]["params"] == [shared.weight] and groups[3]["params"] == []


def test_new_parameters_join_the_optimizer_at_the_next_fit(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    head = nn.Linear(4, 4)
    learn.model.append(head)
    learn.fit(1)
    assert head.weight in learn.opt.state
    assert learn.add_new_params() == 0


def test_bad_arguments_say_what_was_expected(tmp_path):
    learn = make_learner(tmp_path)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1; got 0"):
        learn.fit(0)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0; got nan"):
        learn.fit(1, float("nan"))
    with pytest.raises(TypeError, match="data must be a DataBunch; got list"):
        Learner([], learn.model)
    with pytest.raises(TypeError, match=r"opt_func\(param_groups, lr=lr\) must return"):
        Learner(learn.data, learn.model, opt_func=lambda groups, lr: None).create_opt()
    with pytest.raises(ValueError, match="no validation data"):
        Learner(DataBunch(learn.data.train_dl.dl), learn.model).validate()


def test_each_epoch_shows_a_progress_bar_with_the_loss(tmp_path, monkeypatch):
    bars = []

    class Bar:  # stands in for tqdm, which draws nothing when stderr is not a terminal
        def __init__(self, total, desc, leave, disable):
            self.total, self.desc, self.disable, self.n, self.shown = total, desc, disable, 0, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.shown.append(text)

    monkeypatch.setattr("mixprec.learner.learner.tqdm", Bar)
    learn = make_learner(tmp_path)
    learn.progress = True
    learn.recorder.postfix_every = 3  # the loss is read back and shown every 3 steps
    learn.fit(2)
    n, losses = len(learn.data.train_dl), learn.recorder.losses
    assert [b.desc for b in bars] == ["epoch 1/2", "epoch 2/2"]
    assert all(b.n == b.total == n and b.disable is None for b in bars)
    assert n == 4  # shown after the epoch's 3rd step and after its last
    assert bars[1].shown == [f"loss {losses[n + 2]:.4f}", f"loss {losses[n + 3]:.4f}"]
    make_learner(tmp_path).fit(1)  # progress=False
    assert bars[-1].disable is True


# -- edge cases, each failing before its fix -----------------------------------------
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
    from helpers.learner import tiny_data, tiny_model
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
    from helpers.learner import tiny_data
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
    from mixprec.core.master import master_views as _master_views

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


def test_freeze_with_one_layer_group_says_how_to_pass_groups(tmp_path):
    learn = make_learner(tmp_path)  # the default: one layer group, the whole model
    with pytest.raises(ValueError, match=r"one layer group \(the whole model\), so it would"):
        learn.freeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_lr_0_runs_every_step_and_moves_no_weight(tmp_path):
    learn = make_learner(tmp_path)
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 0)
    assert learn.iteration == 4 and learn.recorder.lrs == [0.0] * 4
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0; got -0.1"):
        learn.fit(1, -0.1)


def sequence_data(n: int = 32, steps: int = 6, vocab: int = 10) -> DataBunch:
    """Token sequences (n, steps) whose targets are the next token: (n, steps) class indices."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, steps), generator=g)
    dl = DataLoader(TensorDataset(x, (x + 1) % vocab), batch_size=8)
    return DataBunch(dl, dl, device="cpu")


@pytest.mark.parametrize("loss_func", [F.cross_entropy, nn.CrossEntropyLoss()])
def test_a_sequence_output_under_cross_entropy_is_refused_naming_model_loss(loss_func):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))  # (batch, time, vocab)
    learn = Learner(sequence_data(), model, loss_func=loss_func, progress=False)
    learn.to_fp16(dtype=torch.bfloat16)
    before = snapshot(learn)
    refused = r"output \(8, 6, 10\) and target \(8, 6\).*loss_func=model_loss"
    for call in (lambda: learn.fit(1), learn.validate):
        with pytest.raises(ValueError, match=refused):
            call()
    assert learn.iteration == 0
    assert_identical(snapshot(learn), before)
    learn.loss_func = model_loss  # what the error says: trains and validates
    learn.fit(1, lr=1e-2)
    assert learn.iteration == 4 and len(learn.validate()) == 1


def test_cross_entropy_keeps_the_classes_in_dim_1_of_a_per_position_output():
    """A (batch, classes, time) output, as a Conv1d gives, is what cross_entropy expects."""
    torch.manual_seed(0)

    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.conv = nn.Embedding(10, 8), nn.Conv1d(8, 10, 1)

        def forward(self, x):
            return self.conv(self.embed(x).transpose(1, 2))  # (batch, 10 classes, time)

    learn = Learner(sequence_data(), PerPosition(), progress=False)
    learn.fit(1, lr=1e-2)
    assert learn.iteration == 4 and len(learn.validate()) == 1
