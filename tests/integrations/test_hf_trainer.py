"""A MixedPrecisionOptimizer in HF transformers' Trainer (stock, with MixedPrecisionCallback,
and MixedPrecisionTrainer) beside the same run in fp32: clipping and the logged grad norm,
gradient accumulation, a skipped inf step, resuming from a checkpoint, the saved fp32
masters, fp16 loss scaling and the refused setups."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers.hf import (
    drift,
    masters_by_name,
    moments,
    reset_accelerate,
    run_doc_blocks,
    tiny_gpt2,
    token_data,
)
from mixprec import MixedPrecisionOptimizer
from mixprec.integrations.hf import MixedPrecisionCallback, MixedPrecisionTrainer

STEPS = 4
TRAINERS = {"Trainer": Trainer, "MixedPrecisionTrainer": MixedPrecisionTrainer}


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def args_for(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def run(tmp_path, trainer_cls=Trainer, dtype=None, callbacks=(), resume=None, **overrides):
    """(trainer, model, optimizer) after training a tiny GPT-2, mixprec in `dtype` (None: fp32)."""
    reset_accelerate()
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if dtype is not None:
        opt = MixedPrecisionOptimizer(opt, model=model, dtype=dtype)
        if trainer_cls is Trainer:
            callbacks = [MixedPrecisionCallback(), *callbacks]
    trainer = trainer_cls(
        model,
        args_for(tmp_path, **overrides),
        train_dataset=token_data(),
        optimizers=(opt, None),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, opt


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry]


@functools.cache
def fp32_reference(**overrides) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """The logged grad norms and losses, and the weights, of the fp32 run (run once)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, model, _ = run(Path(tmp), **overrides)
    logs = {key: logged(trainer, key) for key in ("grad_norm", "loss")}
    return logs, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_clipping_and_logged_grad_norm_see_the_true_norm(tmp_path, name):
    """With the default max_grad_norm=1.0, every step clips: the norm logged (and clipped
    to) is the fp32 run's, not the loss-scaled one, and the losses follow fp32."""
    ref, _ = fp32_reference()
    trainer, model, opt = run(tmp_path / "bf16", TRAINERS[name], torch.bfloat16)
    norms = logged(trainer, "grad_norm")
    assert len(norms) == STEPS and min(ref["grad_norm"]) > 1.0  # the clip acts at every step
    assert norms == pytest.approx(ref["grad_norm"], rel=0.03)
    assert logged(trainer, "loss") == pytest.approx(ref["loss"], abs=0.02)
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_gradient_accumulation_gives_what_fp32_gives(tmp_path, name):
    """Two micro-batches of 2 per step: the norms, losses and weights of fp32 with the same
    accumulation (Adam hides a gradient off by a constant factor; the norm does not)."""
    init = {n: p.detach().clone() for n, p in tiny_gpt2().named_parameters()}
    accumulated = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ref, ref_weights = fp32_reference(**accumulated)
    trainer, model, opt = run(tmp_path / "acc", TRAINERS[name], torch.bfloat16, **accumulated)
    assert logged(trainer, "grad_norm") == pytest.approx(ref["grad_norm"], rel=0.03)
    assert logged(trainer, "loss") == pytest.approx(ref["loss"], abs=0.02)
    # bf16 rounding alone moves these 4 Adam steps ~8 % of the way they went in fp32
    assert drift(masters_by_name(model, opt), ref_weights, init) < 0.15


class InjectInf(TrainerCallback):
    """Puts inf in one weight's gradient on the step after `at` steps, and records the
    masters, moments and scheduler position around that step."""

    def __init__(self, model, opt, at: int) -> None:
        self.opt, self.at, self.active = opt, at, False
        weight = model.transformer.h[0].mlp.c_fc.weight
        weight.register_hook(lambda g: torch.full_like(g, math.inf) if self.active else g)
        self.before = self.after = None

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.active = state.global_step == self.at
        if self.active:
            self.before = (
                masters_by_name_all(self.opt),
                moments(self.opt),
                lr_scheduler.last_epoch,
            )

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.active:
            self.after = (masters_by_name_all(self.opt), moments(self.opt), lr_scheduler.last_epoch)
        self.active = False


def masters_by_name_all(opt) -> list[torch.Tensor]:
    return [v.clone() for v in opt.master_values().values()]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_an_inf_step_is_skipped_logged_and_not_scheduled(tmp_path, name):
    reset_accelerate()
    model = tiny_gpt2()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )
    inject = InjectInf(model, opt, at=2)
    callbacks = [inject] if name == "MixedPrecisionTrainer" else [MixedPrecisionCallback(), inject]
    trainer = TRAINERS[name](
        model,
        args_for(tmp_path),
        train_dataset=token_data(),
        optimizers=(opt, None),
        callbacks=callbacks,
    )
    trainer.train()
    (masters0, moments0, sched0), (masters1, moments1, sched1) = inject.before, inject.after
    assert all(torch.equal(a, b) for a, b in zip(masters0, masters1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(moments0, moments1, strict=True))
    assert sched1 == sched0  # the lr scheduler did not advance on the skipped step
    assert trainer.lr_scheduler.last_epoch == STEPS - 1
    assert opt.skipped_steps == 1
    assert logged(trainer, "skipped_steps") == [0, 0, 1, 1]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_without_the_callback_the_trainer_schedules_a_skipped_step(tmp_path):
    """Why MixedPrecisionCallback exists: Accelerate reports only its own GradScaler's skips,
    so the stock Trainer steps its lr scheduler after the engine skipped."""
    reset_accelerate()
    model = tiny_gpt2()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )
    inject = InjectInf(model, opt, at=2)
    trainer = Trainer(
        model, args_for(tmp_path), train_dataset=token_data(), optimizers=(opt, None),
        callbacks=[inject],
    )  # fmt: skip
    trainer.train()
    assert opt.skipped_steps == 1
    assert inject.after[2] == inject.before[2] + 1  # advanced on the skipped step
    assert trainer.lr_scheduler.last_epoch == STEPS


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path, name):
    saving = dict(max_steps=6, save_strategy="steps", save_steps=3)
    _, model, opt = run(tmp_path / "straight", TRAINERS[name], torch.bfloat16, **saving)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    _, model2, opt2 = run(
        tmp_path / "resumed", TRAINERS[name], torch.bfloat16, resume=str(checkpoint), **saving
    )
    expected, got = masters_by_name(model, opt), masters_by_name(model2, opt2)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert all(torch.equal(a, b) for a, b in zip(moments(opt), moments(opt2), strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_save_pretrained_with_fp32_state_dict_writes_the_exact_masters(tmp_path):
    _, model, opt = run(tmp_path / "run", Trainer, torch.bfloat16)
    model.save_pretrained(tmp_path / "out", state_dict=opt.fp32_state_dict())
    saved = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    masters = masters_by_name(model, opt)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert set(masters) <= set(saved)
    assert all(torch.equal(saved[n], masters[n]) for n in masters)


def test_mixed_precision_trainer_saves_the_fp32_masters(tmp_path):
    trainer, model, opt = run(tmp_path / "run", MixedPrecisionTrainer, torch.bfloat16)
    trainer.save_model(str(tmp_path / "out"))
    saved = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    masters = masters_by_name(model, opt)
    assert all(
        saved[n].dtype == torch.float32 and torch.equal(saved[n], masters[n]) for n in masters
    )


def test_fp16_trains_with_loss_scaling_through_mixed_precision_trainer(tmp_path):
    ref, _ = fp32_reference()
    trainer, _, opt = run(tmp_path / "fp16", MixedPrecisionTrainer, torch.float16, max_steps=2)
    assert opt.loss_scale == 2.0**16 and opt.skipped_steps == 0  # scaled, no overflow
    assert logged(trainer, "grad_norm") == pytest.approx(ref["grad_norm"][:2], rel=0.03)
    assert logged(trainer, "loss") == pytest.approx(ref["loss"][:2], abs=0.02)
    assert logged(trainer, "loss_scale") == [2.0**16, 2.0**16]


def test_the_stock_trainer_refuses_an_fp16_engine(tmp_path):
    with pytest.raises(ValueError, match=r"needs its loss scaled.*MixedPrecisionTrainer"):
        run(tmp_path, Trainer, torch.float16, max_steps=1)


def test_the_callback_refuses_the_trainers_own_bf16(tmp_path):
    with pytest.raises(ValueError, match=r"mixprec does the mixed precision.*bf16=True"):
        run(tmp_path, Trainer, torch.bfloat16, max_steps=1, bf16=True)


def test_the_callback_refuses_a_plain_optimizer(tmp_path):
    with pytest.raises(ValueError, match="MixedPrecisionCallback needs a MixedPrecisionOptimizer"):
        run(tmp_path, Trainer, None, callbacks=[MixedPrecisionCallback()], max_steps=1)


def test_the_docs_page_runs_as_written(tmp_path, monkeypatch):
    assert run_doc_blocks("hf-trainer.md", "tests/integrations/test_hf_trainer.py",
                          tmp_path, monkeypatch) == 2  # fmt: skip
