"""Learner in fp32: fit, validate, param groups and weight decay, freezing, arguments."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learner_helpers import assert_identical, make_learner, snapshot
from mixprec import DataBunch, Learner


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
    with pytest.raises(ValueError, match="lr must be a positive finite number; got nan"):
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
