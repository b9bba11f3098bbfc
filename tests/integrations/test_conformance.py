"""The same checks, parametrized over every front end: an injected inf is skipped and
reported with weights and optimizer state bit-identical; clipping sees the true gradient norm
(the fp32 reference's); accumulating N micro-batches gives the N-times batch; save -> load ->
continue is bit-exact; the fp32 export is the masters; the model can be validated and fitted
again after a fit; frozen parameters get no master.

Every front end (the plain loop, the Learner, Lightning's Trainer and Fabric, Accelerate's
stock Accelerator, HF's stock Trainer with `MixedPrecisionCallback`) trains the same tiny MLP
in bf16 with AdamW over the same batches, 2 steps an epoch. The same modules staying fp32 is
`test_fp32_modules.py` (FSDP2 included); FSDP2's skip and clip run on 2 gloo processes in
`tests/parallel/test_distributed_e2e.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mixprec import DataBunch, Learner, MixedPrecisionOptimizer
from mixprec.learner.callback import Callback

LR = 1e-2
BATCH = 4
STEPS_PER_EPOCH = 2


def make_net(freeze: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    if freeze:
        net[0].requires_grad_(False)
    return net


def batches(accumulate: int = 1, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: STEPS_PER_EPOCH steps of `accumulate` micro-batches of `batch` samples."""
    g = torch.Generator().manual_seed(1)
    n = STEPS_PER_EPOCH * accumulate
    return [(torch.randn(batch, 8, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(n)]  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """How a front end trains: faults at these steps, clipping, micro-batches per step, the
    first layer frozen, where to resume from and save to, a folder of its own."""

    inf_at: frozenset[int] | set[int] | tuple = ()
    clip: float | None = None
    accumulate: int = 1
    freeze: bool = False
    resume: Any = None
    save: Any = None
    path: Any = None


@dataclass
class Run:
    """What a front end left after training: its engine, its model, the fp32 export."""

    engine: MixedPrecisionOptimizer
    model: nn.Module
    export: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None = None  # the clipped step's norm, as the front end saw it

    def __post_init__(self) -> None:
        if self.grad_norm is None:
            self.grad_norm = self.engine.last_grad_norm


def steps(start: int, epochs: int, accumulate: int):
    """(global step, its micro-batches) of epochs `start` to `epochs` - 1."""
    data = batches(accumulate)
    for epoch in range(start, epochs):
        for i in range(STEPS_PER_EPOCH):
            yield epoch * STEPS_PER_EPOCH + i, data[i * accumulate : (i + 1) * accumulate]


def poison(net: nn.Module) -> None:
    net[3].weight.grad.view(-1)[0] = float("inf")


# -- the front ends -----------------------------------------------------------------------------
class PlainLoop:
    name = "plain loop"

    def fit(self, epochs: int, s: Setup) -> Run:
        net = make_net(s.freeze)
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(net.parameters(), lr=LR), model=net, dtype=torch.bfloat16, clip=s.clip
        )
        start = 0
        if s.resume is not None:
            state = torch.load(s.resume, weights_only=True)
            opt.load_state_dict(state["opt"])
            start = state["epochs"]
        for step, micro_batches in steps(start, epochs, s.accumulate):
            for x, y in micro_batches:
                opt.backward(F.cross_entropy(net(x.bfloat16()).float(), y) / s.accumulate)
            if step in s.inf_at:
                poison(net)
            opt.step()
            opt.zero_grad()
        if s.save is not None:
            torch.save({"opt": opt.state_dict(), "epochs": epochs}, s.save)
        return Run(opt, net, opt.fp32_state_dict())

    def evaluate(self, run: Run) -> float:
        x, y = batches()[0]
        with torch.no_grad():
            return F.cross_entropy(run.model(x.bfloat16()).float(), y).item()


class _Poison(Callback):
    order = 0  # before MixedPrecision moves the gradients to the masters

    def __init__(self, net: nn.Module, inf_at) -> None:
        self.net, self.inf_at = net, set(inf_at)

    def on_backward_end(self, iteration: int, **kwargs: Any) -> None:
        if iteration in self.inf_at:
            poison(self.net)


class LearnerFrontEnd:
    name = "Learner"

    def fit(self, epochs: int, s: Setup) -> Run:
        net = make_net(s.freeze)
        data = DataBunch(batches(s.accumulate), batches())
        learn = Learner(
            data, net, opt_func=torch.optim.AdamW, loss_func=F.cross_entropy, path=s.path,
            accumulate=s.accumulate, callbacks=[_Poison(net, s.inf_at)],
        ).to_fp16(dtype=torch.bfloat16, loss_scale="dynamic", clip=s.clip)  # fmt: skip
        done = 0
        if s.resume is not None:
            learn.load(s.resume)
            done = 1
        learn.fit(epochs - done, LR)
        if s.save is not None:
            learn.save(s.save)
        self.learn = learn
        return Run(learn.opt, net, learn.opt.fp32_state_dict())

    def evaluate(self, run: Run) -> float:
        return self.learn.validate()[0]


def _lightning():
    import lightning as L

    from mixprec.integrations.lightning import MixedPrecisionPlugin

    return L, MixedPrecisionPlugin


class LightningTrainer:
    name = "Lightning"

    def module(self, freeze: bool, inf_at, accumulate: int):
        L, _ = _lightning()

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = make_net(freeze)

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_loss", F.cross_entropy(self(x), y))

            def on_after_backward(self) -> None:
                if self.global_step in inf_at:
                    poison(self.net)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=LR)

        return Module()

    def fit(self, epochs: int, s: Setup) -> Run:
        L, Plugin = _lightning()
        module = self.module(s.freeze, s.inf_at, s.accumulate)
        self.plugin = Plugin(torch.bfloat16, clip=s.clip)
        self.trainer = L.Trainer(
            plugins=[self.plugin], max_epochs=epochs, accumulate_grad_batches=s.accumulate,
            accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=s.path,
        )  # fmt: skip
        loader = DataLoader(batches(s.accumulate), batch_size=None)  # the batches as they are
        self.trainer.fit(module, loader, ckpt_path=s.resume)
        if s.save is not None:
            self.trainer.save_checkpoint(s.save)
        engine = self.plugin.optimizer
        export = {k.removeprefix("net."): v for k, v in engine.fp32_state_dict().items()}
        self.module_ = module
        return Run(engine, module.net, export)

    def evaluate(self, run: Run) -> float:
        loader = DataLoader(batches()[:1], batch_size=None)
        (metrics,) = self.trainer.validate(self.module_, loader, verbose=False)
        return metrics["val_loss"]


class Fabric:
    name = "Fabric"

    def fit(self, epochs: int, s: Setup) -> Run:
        L, Plugin = _lightning()
        plugin = Plugin(torch.bfloat16, clip=s.clip)
        fabric = L.Fabric(accelerator="cpu", plugins=[plugin])
        net = make_net(s.freeze)
        model, opt = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=LR))
        start = 0
        if s.resume is not None:
            state = {"model": model, "mixprec": plugin}
            fabric.load(s.resume, state)
            start = 1
        for step, micro_batches in steps(start, epochs, s.accumulate):
            for x, y in micro_batches:
                fabric.backward(F.cross_entropy(model(x), y) / s.accumulate)
            if step in s.inf_at:
                poison(net)
            opt.step()
            opt.zero_grad()
        if s.save is not None:
            fabric.save(s.save, {"model": model, "mixprec": plugin})
        self.model = model
        return Run(plugin.optimizer, net, plugin.optimizer.fp32_state_dict())

    def evaluate(self, run: Run) -> float:
        x, y = batches()[0]
        with torch.no_grad():
            return F.cross_entropy(self.model(x), y).item()


class AccelerateLoop:
    """The stock `Accelerator(mixed_precision="no")`, mixprec doing the precision."""

    name = "Accelerate"

    def fit(self, epochs: int, s: Setup) -> Run:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)  # a fresh Accelerator each run
        GradientState._reset_state()
        acc = Accelerator(cpu=True, gradient_accumulation_steps=s.accumulate)
        net = make_net(s.freeze)
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(net.parameters(), lr=LR), model=net, dtype=torch.bfloat16
        )
        model, prepared = acc.prepare(net, opt)
        start = 0
        if s.resume is not None:
            acc.load_state(s.resume)
            start = 1
        for step, micro_batches in steps(start, epochs, s.accumulate):
            for x, y in micro_batches:
                with acc.accumulate(model):
                    acc.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
                    if acc.sync_gradients:
                        if step in s.inf_at:
                            poison(net)
                        if s.clip is not None:
                            self.norm = acc.clip_grad_norm_(model.parameters(), s.clip)
                    prepared.step()
                    prepared.zero_grad()
        if s.save is not None:
            acc.save_state(s.save)
        self.model = model
        run = Run(opt, net, opt.fp32_state_dict())
        if s.clip is not None:
            run.grad_norm = self.norm
        return run

    def evaluate(self, run: Run) -> float:
        x, y = batches()[0]
        with torch.no_grad():
            return F.cross_entropy(self.model(x.bfloat16()).float(), y).item()


class HFTrainer:
    """HF transformers' stock `Trainer` with `MixedPrecisionCallback` (bf16: no subclass
    needed), over the same batches in order."""

    name = "HF Trainer"

    class Wrapped(nn.Module):  # an HF-style forward: the loss in the output
        def __init__(self, freeze: bool) -> None:
            super().__init__()
            self.net = make_net(freeze)

        def forward(self, x, labels=None):
            logits = self.net(x.to(next(self.net.parameters()).dtype)).float()
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = F.cross_entropy(logits, labels)
            return out

    def fit(self, epochs: int, s: Setup) -> Run:
        from accelerate.state import AcceleratorState, GradientState
        from torch.utils.data import SequentialSampler
        from transformers import Trainer, TrainerCallback, TrainingArguments

        from mixprec.integrations.hf import MixedPrecisionCallback

        class InOrder(Trainer):  # the batches as the other front ends see them
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        class Poison(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if state.global_step in s.inf_at:
                    poison(model.net)

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        model = self.Wrapped(s.freeze)
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01), model=model,
            dtype=torch.bfloat16,
        )  # fmt: skip
        data = [{"x": x[i], "labels": y[i]} for x, y in batches(s.accumulate) for i in range(BATCH)]
        args = TrainingArguments(
            output_dir=str(s.path), report_to=[], use_cpu=True, num_train_epochs=epochs,
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=s.accumulate,
            learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=s.clip or 0.0,
            logging_steps=1, save_strategy="epoch" if s.save is not None else "no",
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        self.trainer = InOrder(
            model, args, train_dataset=data, optimizers=(opt, None),
            callbacks=[MixedPrecisionCallback(), Poison()],
        )  # fmt: skip
        self.trainer.train(resume_from_checkpoint=s.resume)
        self.model = model
        run = Run(
            opt, model.net, {k.removeprefix("net."): v for k, v in opt.fp32_state_dict().items()}
        )
        if s.clip is not None:
            norms = [h["grad_norm"] for h in self.trainer.state.log_history if "grad_norm" in h]
            run.grad_norm = torch.tensor(norms[-1])
        return run

    def evaluate(self, run: Run) -> float:
        x, y = batches()[0]
        data = [{"x": x[i], "labels": y[i]} for i in range(BATCH)]
        return self.trainer.evaluate(data)["eval_loss"]


FRONT_ENDS: dict[str, Callable[[], Any]] = {
    "plain loop": PlainLoop,
    "Learner": LearnerFrontEnd,
    "Lightning": LightningTrainer,
    "Fabric": Fabric,
    "Accelerate": AccelerateLoop,
    "HF Trainer": HFTrainer,
}


def _fit(front_end, tmp_path, epochs, **options):
    return front_end.fit(epochs, Setup(path=tmp_path, **options))


def _state_tensors(engine: MixedPrecisionOptimizer) -> list[torch.Tensor]:
    state = engine.state_dict()
    masters = [m for g in state["masters"] for m in g]
    moments = [
        v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)
    ]
    return [t.detach().clone() for t in masters + moments]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- the checks ------------------------------------------------------------------------------
@pytest.fixture(params=list(FRONT_ENDS))
def front_end(request):
    if request.param in ("Lightning", "Fabric"):
        pytest.importorskip("lightning")
    if request.param in ("Accelerate", "HF Trainer"):
        pytest.importorskip("accelerate")
    if request.param == "HF Trainer":
        pytest.importorskip("transformers")
    return FRONT_ENDS[request.param]()


def test_an_injected_inf_is_skipped_with_weights_and_state_unchanged(front_end, tmp_path):
    one_epoch = _fit(front_end, tmp_path / "a", 1)
    skipped = _fit(type(front_end)(), tmp_path / "b", 2, inf_at={2, 3})  # all of epoch 2
    assert skipped.engine.skipped_steps == 2 and skipped.engine.step_was_skipped
    (name,) = skipped.engine.last_overflow.names  # the poisoned layer, named
    assert name.endswith("3.weight")
    # the masters, AdamW's moments and step counts as the clean first epoch left them
    assert _same(_state_tensors(one_epoch.engine), _state_tensors(skipped.engine))
    assert all(torch.equal(one_epoch.export[k], skipped.export[k]) for k in one_epoch.export)


def test_clipping_sees_the_true_gradient_norm(front_end, tmp_path):
    run = _fit(front_end, tmp_path, 1, clip=1e-3)
    # the fp32 reference: the same two steps, clipped in fp32
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    norms = []
    for x, y in batches():
        F.cross_entropy(net(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3))
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(run.grad_norm.float(), norms[-1], rtol=3e-2, atol=0)
    for name, p in net.named_parameters():  # updates of at most lr per element, both sides
        torch.testing.assert_close(run.export[name], p.detach(), rtol=0, atol=2e-3)


def test_accumulating_n_micro_batches_gives_the_n_times_batch(front_end, tmp_path):
    accumulated = _fit(front_end, tmp_path / "a", 1, accumulate=2)
    big = batches(accumulate=2)
    merged = [(torch.cat([big[2 * i][0], big[2 * i + 1][0]]), torch.cat([big[2 * i][1], big[2 * i + 1][1]])) for i in range(STEPS_PER_EPOCH)]  # fmt: skip
    net = make_net()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(net.parameters(), lr=LR), model=net, dtype=torch.bfloat16
    )
    for x, y in merged:
        opt.backward(F.cross_entropy(net(x.bfloat16()).float(), y))
        opt.step()
        opt.zero_grad()
    for name, value in opt.fp32_state_dict().items():
        # two bf16 backward passes summed vs one over the merged batch: bf16 rounding apart
        torch.testing.assert_close(accumulated.export[name], value, rtol=0, atol=2e-3)


def test_save_load_continue_is_bit_exact(front_end, tmp_path):
    straight = _fit(type(front_end)(), tmp_path / "a", 2)
    suffix = {
        "Learner": "first",
        "plain loop": tmp_path / "p.pt",
        "Accelerate": tmp_path / "state",
        "HF Trainer": tmp_path / "b" / f"checkpoint-{STEPS_PER_EPOCH}",
    }.get(front_end.name, tmp_path / "c.ckpt")
    _fit(type(front_end)(), tmp_path / "b", 1, save=suffix)
    resumed = _fit(type(front_end)(), tmp_path / "b", 2, resume=suffix)
    assert straight.export.keys() == resumed.export.keys()
    assert all(torch.equal(straight.export[k], resumed.export[k]) for k in straight.export)
    assert _same(_state_tensors(straight.engine), _state_tensors(resumed.engine))


def test_the_fp32_export_is_the_masters(front_end, tmp_path):
    run = _fit(front_end, tmp_path, 1)
    values = run.engine.master_values()
    by_name = dict(run.model.named_parameters())
    for name, p in by_name.items():
        assert run.export[name].dtype == torch.float32
        assert torch.equal(run.export[name], values[id(p)].reshape(p.shape))
    fp32 = make_net()
    fp32.load_state_dict(run.export)


def test_validate_after_fit_and_fit_again(front_end, tmp_path):
    run = _fit(front_end, tmp_path, 1)
    loss = front_end.evaluate(run)
    assert 0 < loss < 10
    again = _fit(front_end, tmp_path / "again", 1)  # a second fit, a fresh model
    assert again.engine.skipped_steps == 0


def test_frozen_parameters_get_no_master(front_end, tmp_path):
    run = _fit(front_end, tmp_path, 1, freeze=True)
    frozen = {id(p) for p in run.model[0].parameters()}
    assert not frozen & set(run.engine.master_values())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in run.engine.master_values().values()) == trainable
    fresh = make_net()
    for name, p in fresh[0].named_parameters():  # the frozen layer never moved
        torch.testing.assert_close(run.export[f"0.{name}"], p.detach(), rtol=0, atol=4e-3)
