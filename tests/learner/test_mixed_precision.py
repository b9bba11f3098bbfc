"""The MixedPrecision callback and Learner.to_fp16 / to_fp32."""

import pytest
import torch
from torch.nn import functional as F

import mixprec
from helpers.learner import (
    Probe,
    assert_identical,
    make_learner,
    master_of,
    opt_state_of,
    snapshot,
)
from mixprec import Callback, MixedPrecisionOptimizer
from mixprec.learner.mixed_precision import (
    MixedPrecision,
    get_master,
    master2model,
    model_g2master_g,
)

DYNAMIC = {"loss_scale": "dynamic", "init_scale": 2.0**20, "growth_interval": 3}  # skips, grows


def test_the_documented_import_path_gives_the_package_objects():
    assert MixedPrecision is mixprec.MixedPrecision
    assert get_master is mixprec.get_master
    assert model_g2master_g is mixprec.model_g2master_g
    assert master2model is mixprec.master2model


def test_to_fp16_converts_at_once_with_the_documented_defaults(tmp_path):
    learn = make_learner(tmp_path)
    fp32_weight = learn.model[0].weight.detach().clone()
    assert learn.to_fp16() is learn
    model, opt = learn.model, learn.opt
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
    assert isinstance(learn.mixed_precision, MixedPrecision)
    assert isinstance(opt, MixedPrecisionOptimizer) and not opt.flat_master
    assert not opt.scaler.dynamic and opt.loss_scale == 512.0
    # masters hold the fp32 values the model had, not their fp16 rounding
    assert torch.equal(master_of(learn, model[0].weight), fp32_weight)
    assert not torch.equal(fp32_weight.half().float(), fp32_weight)
    with pytest.raises(ValueError, match="already in mixed precision"):
        learn.to_fp16()


def test_to_fp16_passes_its_options_through(tmp_path):
    learn = make_learner(tmp_path).to_fp16(
        "dynamic", True, dtype=torch.bfloat16, clip=1.0, init_scale=256.0, growth_interval=7
    )
    opt = learn.opt
    assert learn.model[0].weight.dtype == torch.bfloat16
    assert opt.flat_master and opt.clip == 1.0 and opt.scaler.dynamic
    assert (opt.loss_scale, opt.scaler.growth_interval) == (256.0, 7)
    with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
        make_learner(tmp_path).to_fp16(loss_scale=-1.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_learner(tmp_path).to_fp16(dtype=torch.float64)


def test_a_callback_added_by_hand_converts_at_the_first_fit(tmp_path):
    learn = make_learner(tmp_path)
    learn.add_cb(MixedPrecision(learn, loss_scale="dynamic"))
    assert learn.model[0].weight.dtype == torch.float32
    learn.fit(1)
    assert learn.model[0].weight.dtype == torch.float16
    assert isinstance(learn.opt, MixedPrecisionOptimizer) and learn.opt.scaler.dynamic


def test_the_six_documented_events(tmp_path):
    seen = {}

    class Before(Callback):  # runs before MixedPrecision (order 99)
        order = 50

        def on_batch_begin(self, last_input, learn, **kwargs):
            seen.setdefault("input", last_input.dtype)
            seen.setdefault("tfms", list(learn.data.tfms))

        def on_backward_end(self, learn, **kwargs):
            if "model_grad" not in seen:
                seen["model_grad"] = learn.model[0].weight.grad.clone()

    class After(Callback):
        order = 100

        def on_loss_begin(self, last_output, **kwargs):
            seen.setdefault("output", last_output.dtype)

        def on_backward_end(self, learn, **kwargs):
            if "master_grad" not in seen:
                seen["master_grad"] = learn.opt.master_params[0][0].grad.clone()

        def on_step_end(self, learn, **kwargs):
            for p in learn.model.parameters():
                assert torch.equal(p, master_of(learn, p).to(p.dtype))
                assert p.grad is None or not p.grad.any()

    learn = make_learner(tmp_path, callbacks=[Before(), After()]).to_fp16()
    learn.fit(1)
    assert seen["input"] == torch.float16  # the transform added at on_train_begin
    assert seen["tfms"] == [learn.mixed_precision._tfm]
    assert learn.data.tfms == []  # removed at on_train_end
    assert seen["output"] == torch.float32  # on_loss_begin
    # on_backward_begin scaled by 512, on_backward_end unscaled into the fp32 masters
    assert seen["model_grad"].dtype == torch.float16
    assert torch.equal(seen["master_grad"], seen["model_grad"].float() / 512)


def test_fit_1_twice_equals_fit_2_with_masters_moments_and_scaler_kept(tmp_path):
    for flat in (False, True):
        a = make_learner(tmp_path).to_fp16(flat_master=flat, **DYNAMIC)
        a.fit(1)
        opt = a.opt
        a.fit(1)
        assert a.opt is opt
        b = make_learner(tmp_path).to_fp16(flat_master=flat, **DYNAMIC)
        b.fit(2)
        assert_identical(snapshot(a), snapshot(b), f"flat={flat}")
        assert a.recorder.loss_scales == b.recorder.loss_scales
        assert a.recorder.skipped_steps > 0  # the scaler backed off and grew along the way


def test_a_skipped_step_changes_nothing(tmp_path):
    def trained(learn):
        s = snapshot(learn)
        return {"params": [p.detach().clone() for p in learn.model.parameters()], **s}

    class Overflow(Callback):
        order = 50  # before MixedPrecision scales the loss

        def on_batch_begin(self, learn, iteration, **kwargs):
            if iteration == 2:
                self.before = trained(learn)

        def on_backward_begin(self, last_loss, iteration, **kwargs):
            return last_loss * float("inf") if iteration == 2 else None

        def on_batch_end(self, learn, iteration, **kwargs):
            if iteration == 2:
                self.after = trained(learn)

    cb = Overflow()
    learn = make_learner(tmp_path, callbacks=[cb]).to_fp16("dynamic", init_scale=1024.0)
    learn.fit(1)
    for key in ("params", "masters", "opt"):
        assert_identical(cb.before[key], cb.after[key], key)
    assert cb.after["scaler"]["scale"] == cb.before["scaler"]["scale"] / 2
    assert learn.recorder.skipped == [False, False, True, False]
    assert learn.opt.skipped_steps == learn.recorder.skipped_steps == 1
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))


def test_callbacks_and_the_recorder_never_see_the_scaled_loss(tmp_path):
    probe = Probe(order=0, keys=("last_loss",))
    outputs = Probe(order=100, keys=("last_output", "last_target", "train"))
    learn = make_learner(tmp_path, callbacks=[probe, outputs]).to_fp16()
    learn.fit(1)
    losses = learn.recorder.losses
    fp32_losses = [
        F.cross_entropy(s["last_output"], s["last_target"]).item()
        for e, s in outputs.seen
        if e == "on_loss_begin" and s["train"]  # not validate()'s
    ]
    assert losses == fp32_losses and max(losses) < 5  # unscaled: 512x would be in the hundreds
    for event in ("on_backward_begin", "on_backward_end", "on_step_end", "on_batch_end"):
        values = [s["last_loss"].item() for e, s in probe.seen if e == event]
        assert values == losses, event


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_freezing_between_fits_keeps_masters_and_moments(tmp_path, flat, fused):
    learn = make_learner(tmp_path, layer_groups=True)
    body, head = learn.model[0].weight, learn.model[3].weight
    body_fp32 = body.detach().clone()
    learn.to_fp16(flat_master=flat, fused=fused)
    learn.freeze()
    learn.fit(1)
    n = len(learn.data.train_dl)
    assert torch.equal(master_of(learn, body), body_fp32)  # frozen: untouched, still exact
    assert opt_state_of(learn, body) == {}
    kept = {"master": master_of(learn, head).clone(), "state": opt_state_of(learn, head)}

    class AtStart(Callback):
        order = 100  # after MixedPrecision.on_train_begin

        def on_train_begin(self, learn, **kwargs):
            self.seen = {
                "master": master_of(learn, head).clone(),
                "state": opt_state_of(learn, head),
            }
            self.body = master_of(learn, body).clone()

    start = AtStart()
    learn.add_cb(start)
    learn.unfreeze()
    learn.fit(1)
    assert_identical(start.seen, kept)  # nothing rebuilt from the rounded half copy
    assert torch.equal(start.body, body_fp32)  # the newly trainable weight starts exact
    assert not torch.equal(master_of(learn, body), body_fp32)  # and now trains
    assert opt_state_of(learn, head)["step"].item() == 2 * n
    assert opt_state_of(learn, body)["step"].item() == n


def test_flat_masters_reject_a_group_mixing_frozen_and_trainable(tmp_path):
    learn = make_learner(tmp_path).to_fp16(flat_master=True)
    learn.model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="cannot mix frozen and trainable parameters"):
        learn.fit(1)


@pytest.mark.parametrize("flat", [False, True])
def test_to_fp32_restores_the_model_from_the_masters(tmp_path, flat):
    learn = make_learner(tmp_path).to_fp16(flat_master=flat)
    learn.fit(1)
    params = list(learn.model.parameters())
    masters = [master_of(learn, p).clone() for p in params]
    half = [p.detach().clone() for p in params]
    assert learn.to_fp32() is learn
    assert learn.mixed_precision is None and learn.data.tfms == []
    assert all(p.dtype == torch.float32 for p in params)
    assert_identical([p.detach() for p in params], masters)
    assert any(not torch.equal(m, h.float()) for m, h in zip(masters, half))
    opt, n = learn.opt, len(learn.data.train_dl)
    assert isinstance(opt, torch.optim.AdamW)
    assert [p for g in opt.param_groups for p in g["params"]] == [
        p for g in learn.param_groups() for p in g["params"]
    ]
    assert all(opt.state[p]["step"].item() == n for p in params)
    learn.fit(1)
    assert all(opt.state[p]["step"].item() == 2 * n for p in params)


def test_validate_and_predict_on_a_half_model_outside_fit(tmp_path):
    learn = make_learner(tmp_path)
    x, _ = learn.data.valid_dl.dl.dataset.tensors
    ref_loss, ref_acc = learn.validate()
    ref_out = learn.predict(x)
    for dtype in (torch.float16, torch.bfloat16):
        learn = make_learner(tmp_path).to_fp16(dtype=dtype)
        loss, acc = learn.validate()  # fp32 inputs: cast to the model's dtype
        assert loss == pytest.approx(ref_loss, rel=0.05) and acc == pytest.approx(ref_acc, abs=0.1)
        out = learn.predict(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref_out, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("flat", [False, True])
def test_fused_steps_from_the_half_grads_with_the_same_numbers(tmp_path, flat):
    class MasterGrads(Callback):
        order = 100  # after MixedPrecision.on_backward_end

        def on_backward_end(self, learn, **kwargs):
            self.held = any(m.grad is not None for g in learn.opt.master_params for m in g)

    runs = {}
    for fused in (False, True):
        probe = MasterGrads()
        learn = make_learner(tmp_path, callbacks=[probe]).to_fp16(flat_master=flat, fused=fused)
        learn.fit(1)
        runs[fused] = learn
        assert learn.opt.fused is fused and probe.held is not fused  # fused: no fp32 grads
    masters = [[m.detach() for g in learn.opt.master_params for m in g] for learn in runs.values()]
    torch.testing.assert_close(masters[1], masters[0], rtol=1e-5, atol=1e-6)


def test_an_unknown_option_is_refused_by_name_and_leaves_the_model_fp32(tmp_path):
    learn = make_learner(tmp_path)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    with pytest.raises(ValueError, match=r"master='split', dtype=torch.float16\): split masters"):
        learn.to_fp16(master="split")
    with pytest.raises(ValueError, match=r'must be "fp32" or "split"; got \'bf16\''):
        learn.to_fp16(dtype=torch.bfloat16, master="bf16")
    with pytest.raises(ValueError, match=r"mode='autocast', master='split'\): split masters"):
        learn.to_fp16(dtype=torch.bfloat16, mode="autocast", master="split")
    with pytest.raises(TypeError, match=r"unknown option\(s\) init_sacle; .* init_scale"):
        learn.to_fp16("dynamic", init_sacle=2.0**10)
    for n, p in learn.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


@pytest.mark.parametrize("kw", [{}, {"fused": False}, {"master": "split"}, {"flat_master": True}])
def test_masters_survive_model_float_between_fits(tmp_path, kw):
    learn = make_learner(tmp_path).to_fp16(dtype=torch.bfloat16, **kw)
    learn.fit(1)
    masters = {k: v.clone() for k, v in learn.opt.master_values().items()}
    learn.model.float()  # the rounded half weights, widened
    learn.fit(1, 0.0)  # lr 0: nothing moves
    after = learn.opt.master_values()
    assert masters.keys() == after.keys()
    assert all(torch.equal(masters[k], after[k]) for k in masters)
    for p in learn.model.parameters():  # the model holds the masters' rounding again
        assert torch.equal(p.detach(), after[id(p)].to(p.dtype).reshape(p.shape))


@pytest.mark.parametrize("kw", [{}, {"fused": False}, {"master": "split"}])
def test_a_layer_frozen_before_to_fp16_trains_from_its_exact_weights_once_unfrozen(tmp_path, kw):
    learn = make_learner(tmp_path, layer_groups=True)
    body = learn.model[0].weight
    body_fp32 = body.detach().clone()
    learn.freeze()  # before the wrapper exists: the frozen body gets no master
    learn.to_fp16(dtype=torch.bfloat16, **kw)
    learn.fit(1)
    assert id(body) not in learn.opt.master_values()
    assert not torch.equal(body.detach().float(), body_fp32)  # the half model is rounded

    class AtStart(Callback):
        order = 100  # after MixedPrecision.on_train_begin

        def on_train_begin(self, learn, **kwargs):
            self.body = learn.opt.master_values()[id(body)].clone()

    start = AtStart()
    learn.unfreeze()
    learn.fit(1, callbacks=[start])
    assert torch.equal(start.body.reshape(body.shape), body_fp32)  # its exact fp32 weight
