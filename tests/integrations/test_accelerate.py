"""A MixedPrecisionOptimizer under Accelerate (the stock `Accelerator(mixed_precision="no")`
and `MixedPrecisionAccelerator`) beside fp32: backward, clip_grad_norm_ and accumulate,
a skipped inf step, save_state/load_state, fp16, and the refused setups."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

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
from mixprec.integrations.accelerate import MixedPrecisionAccelerator

ACCELERATORS = {"Accelerator": Accelerator, "MixedPrecisionAccelerator": MixedPrecisionAccelerator}


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


class Run:
    """A tiny GPT-2 prepared by an accelerator, with an lr scheduler, trained step by step."""

    def __init__(self, cls=Accelerator, dtype=None, batch=4, accumulate=1, clip=1.0):
        reset_accelerate()
        self.model = tiny_gpt2()
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        if dtype is not None:
            opt = MixedPrecisionOptimizer(opt, model=self.model, dtype=dtype)
        self.engine = opt if dtype is not None else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
        loader = DataLoader(token_data(), batch_size=batch)
        self.accelerator = cls(
            mixed_precision="no", cpu=True, gradient_accumulation_steps=accumulate
        )
        self.model, self.opt, self.loader, self.sched = self.accelerator.prepare(
            self.model, opt, loader, sched
        )
        self.clip = clip
        self.inf = False  # put inf in one weight's gradient
        weight = self.model.transformer.h[0].mlp.c_fc.weight
        weight.register_hook(lambda g: torch.full_like(g, math.inf) if self.inf else g)
        self.norms: list[float] = []
        self.losses: list[float] = []
        self.skipped: list[bool] = []
        self.around_inf: tuple | None = None  # (masters, moments, lr) before and after it

    def train(self, skip_batches: int = 0, inf_at: int | None = None) -> Run:
        for i, batch in enumerate(self.loader):
            if i < skip_batches:
                continue
            self.inf = i == inf_at
            before = self.snapshot() if self.inf else None
            with self.accelerator.accumulate(self.model):
                loss = self.model(**batch).loss
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.clip is not None:
                    self.norms.append(float(self.accelerator.clip_grad_norm_(
                        self.model.parameters(), self.clip
                    )))  # fmt: skip
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad()
            if self.accelerator.sync_gradients:
                self.skipped.append(self.accelerator.optimizer_step_was_skipped)
            if before is not None:
                self.around_inf = (before, self.snapshot())
            self.losses.append(float(loss))
        return self

    def snapshot(self) -> tuple:
        return (
            masters_by_name(self.model, self.engine),
            moments(self.engine),
            self.sched.get_last_lr(),
        )

    def weights(self) -> dict[str, torch.Tensor]:
        if self.engine is None:
            return {n: p.detach() for n, p in self.model.named_parameters()}
        return masters_by_name(self.model, self.engine)


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_backward_clip_and_accumulate_behave_as_in_fp32(name):
    """Micro-batches of 2 accumulated in pairs, clipped to 1.0, in bf16: the norms, losses and
    weights of fp32 on whole batches of 4 (a loss left undivided would double the norm)."""
    ref = Run().train()
    run = Run(ACCELERATORS[name], torch.bfloat16, batch=2, accumulate=2).train()
    assert len(run.norms) == 4 and min(ref.norms) > 1.0  # clipping on every step
    # the same start: only bf16 rounding apart; later steps drift a little further
    assert run.norms[0] == pytest.approx(ref.norms[0], rel=0.02)
    assert run.norms == pytest.approx(ref.norms, rel=0.1)
    pairs = [sum(run.losses[i : i + 2]) / 2 for i in range(0, 8, 2)]
    assert pairs == pytest.approx(ref.losses, abs=0.02)
    assert (
        drift(run.weights(), ref.weights(), run.init) < 0.15
    )  # bf16 rounding alone: ~8 % over these 4 Adam steps
    assert run.engine.skipped_steps == 0


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_an_inf_step_is_skipped(name):
    """Weights and moments stay as they were; MixedPrecisionAccelerator also tells the
    accelerator and its prepared scheduler, which the stock one cannot."""
    run = Run(ACCELERATORS[name], torch.bfloat16).train(inf_at=2)
    (masters0, moments0, lr0), (masters1, moments1, lr1) = run.around_inf
    assert all(torch.equal(masters0[n], masters1[n]) for n in masters0)
    assert all(torch.equal(a, b) for a, b in zip(moments0, moments1, strict=True))
    assert run.engine.skipped_steps == 1
    told = name == "MixedPrecisionAccelerator"
    assert run.skipped == [False, False, told, False]
    assert (lr1 == lr0) == told  # the prepared scheduler holds still only when told
    assert all(math.isfinite(v) for v in run.losses)


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_save_state_and_load_state_resume_exactly(name, tmp_path):
    straight = Run(ACCELERATORS[name], torch.bfloat16)
    for i, batch in enumerate(straight.loader):
        if i == 2:
            straight.accelerator.save_state(str(tmp_path))
        loss = straight.model(**batch).loss
        straight.accelerator.backward(loss)
        straight.accelerator.clip_grad_norm_(straight.model.parameters(), 1.0)
        straight.opt.step()
        straight.sched.step()
        straight.opt.zero_grad()
    resumed = Run(ACCELERATORS[name], torch.bfloat16)
    resumed.accelerator.load_state(str(tmp_path))
    resumed.train(skip_batches=2)
    expected, got = straight.weights(), resumed.weights()
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert all(torch.equal(a, b) for a, b in zip(moments(straight.engine), moments(resumed.engine)))
    assert straight.sched.get_last_lr() == resumed.sched.get_last_lr()


def test_fp16_scales_the_loss_under_mixed_precision_accelerator():
    """The stock Accelerator's backward does not scale: fp16 needs the subclass."""
    ref = Run(batch=8).train()
    run = Run(MixedPrecisionAccelerator, torch.float16, batch=8).train()
    assert run.engine.loss_scale == 2.0**16 and run.engine.skipped_steps == 0
    assert run.norms[0] == pytest.approx(ref.norms[0], rel=0.02)
    assert run.norms == pytest.approx(ref.norms, rel=0.1)
    assert run.losses == pytest.approx(ref.losses, abs=0.02)


def test_mixed_precision_accelerator_refuses_its_own_mixed_precision():
    with pytest.raises(ValueError, match=r"mixprec does the mixed precision.*'bf16'"):
        MixedPrecisionAccelerator(mixed_precision="bf16", cpu=True)


def test_mixed_precision_accelerator_refuses_to_clip_part_of_the_engine():
    run = Run(MixedPrecisionAccelerator, torch.bfloat16)
    batch = next(iter(run.loader))
    run.accelerator.backward(run.model(**batch).loss)
    with pytest.raises(ValueError, match="clips all of its parameters together"):
        run.accelerator.clip_grad_norm_(run.model.lm_head.parameters(), 1.0)


def test_mixed_precision_accelerator_refuses_two_engines():
    reset_accelerate()
    accelerator = MixedPrecisionAccelerator(mixed_precision="no", cpu=True)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opts = [
        MixedPrecisionOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                                dtype=torch.bfloat16)
        for m in (a, b)
    ]  # fmt: skip
    accelerator.prepare(*opts)
    loss = (a(torch.ones(1, 4, dtype=torch.bfloat16)).sum() + b(
        torch.ones(1, 4, dtype=torch.bfloat16)).sum()).float()  # fmt: skip
    with pytest.raises(ValueError, match="scales each loss for one MixedPrecisionOptimizer"):
        accelerator.backward(loss)


def test_the_docs_page_runs_as_written(tmp_path, monkeypatch):
    page, runner = "accelerate.md", "tests/integrations/test_accelerate.py"
    assert run_doc_blocks(page, runner, tmp_path, monkeypatch) == 2
    assert (tmp_path / "state" / "optimizer.bin").exists()
    saved = safetensors.torch.load_file(tmp_path / "fp32" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
