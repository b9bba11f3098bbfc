"""MixedPrecisionPlugin with Lightning's Trainer and Fabric: master and autocast modes, a
skipped step left unapplied and reported, the persistent-overflow error, exact resume from a
Trainer checkpoint, accumulation and clipping beside the engine's own loop, DDP on gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L
from torch.nn import functional as F

from helpers.lightning_modules import Tiny, make_net, tiny_loader, trainer
from helpers.tensors import tensors_in
from mixprec import AutocastOptimizer, MixedPrecisionOptimizer
from mixprec.engine.conversion import to_half_keeping_exact
from mixprec.integrations.lightning import MixedPrecisionPlugin


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


class Snapshots(L.Callback):
    """Masters, optimizer state and lr before and after every optimizer step."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []
        self.skipped: list[bool] = []

    @staticmethod
    def _state(trainer: L.Trainer) -> list[torch.Tensor]:
        opt = trainer.optimizers[0]
        masters = [m for group in opt.param_groups for m in group["params"]]
        return [t.detach().clone() for t in [*masters, *tensors_in(opt.optimizer.state_dict())]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(self._state(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self._state(trainer))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.skipped.append(trainer.precision_plugin.step_was_skipped)


# -- the engine glue ------------------------------------------------------------------------
def test_masters_take_the_exact_fp32_weights_not_their_rounding():
    net = make_net()
    fp32 = params_of(net)
    exact = to_half_keeping_exact(net, torch.bfloat16, None)
    engine = MixedPrecisionOptimizer(torch.optim.AdamW(net.parameters()), fused=False)
    engine.load_master_values_(exact)
    masters = [m.detach() for group in engine.master_params for m in group]
    assert same(masters, fp32)
    assert not same([p.float() for p in net.parameters()], fp32)  # the model itself rounded


# -- master mode: a skipped step ----------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_skipped_step_is_not_applied_reported_and_holds_the_scheduler(fused):
    snaps = Snapshots()
    plugin = MixedPrecisionPlugin(torch.bfloat16, fused=fused, growth_interval=1000)
    module = Tiny(inf_at=(2,), schedule=True)
    trainer(plugin, max_steps=4, callbacks=[snaps]).fit(module, tiny_loader())

    assert snaps.skipped == [False, False, True, False]
    assert same(snaps.before[2], snaps.after[2])  # masters, Adam moments and step counts
    assert not same(snaps.before[1], snaps.after[1])
    assert snaps.lrs == [5e-3, 2.5e-3, 2.5e-3, 1.25e-3]  # no lr step after the skipped one
    assert plugin.skipped_steps == 1 and plugin.scale == 2.0**15  # backed off once
    assert plugin.last_overflow.names == ["net.0.weight"]
    assert plugin.last_overflow.step == 2
    # after fit the module is fp32 again and holds the masters, not their rounding
    engine = plugin.optimizer
    assert isinstance(engine, MixedPrecisionOptimizer)
    masters = [m.detach() for group in engine.master_params for m in group]
    assert same(params_of(module), masters)


def test_metrics_are_logged_each_step(tmp_path):
    module = Tiny(inf_at=(1,))
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer(MixedPrecisionPlugin(), max_steps=3, logger=logger, log_every_n_steps=1).fit(
        module, tiny_loader()
    )
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [float(r["mixprec/step_skipped"]) for r in rows] == [0.0, 1.0, 0.0]
    assert [float(r["mixprec/skipped_steps"]) for r in rows] == [0.0, 1.0, 1.0]
    assert [float(r["mixprec/loss_scale"]) for r in rows] == [2.0**16, 2.0**15, 2.0**15]
    assert float(rows[1]["mixprec/grad_norm"]) == float("inf")
    assert 0 < float(rows[2]["mixprec/grad_norm"]) < float("inf")


def test_persistent_overflow_raises_naming_the_layer():
    module = Tiny(inf_at=tuple(range(10)))
    plugin = MixedPrecisionPlugin(loss_scale=8.0, floor_patience=3)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps.*net\.0\.weight"):
        trainer(plugin, max_steps=10).fit(module, tiny_loader())


# -- the engine's own loop as the reference -------------------------------------------------
def engine_loop(
    accumulate: int, clip: float | None, steps: int, unscale: bool = False
) -> list[torch.Tensor]:
    """The same training with MixedPrecisionOptimizer directly (masters from fp32)."""
    net = make_net()
    engine = MixedPrecisionOptimizer(
        torch.optim.AdamW(net.parameters(), lr=1e-2), clip=clip, model=net,
        dtype=torch.bfloat16,
    )  # fmt: skip
    batches = iter(tiny_loader())
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            loss = F.cross_entropy(net(x.bfloat16()).float(), y)
            engine.backward(loss / accumulate)
        if unscale:  # clipped in fp32 before the step, as Lightning's clip_gradients does
            engine.unscale_()
        engine.step()
        engine.zero_grad()
    return [m.detach().clone() for group in engine.master_params for m in group]


@pytest.mark.parametrize("accumulate, clip", [(1, None), (2, 0.05)])
def test_trainer_matches_the_engine_loop_with_accumulation_and_clipping(accumulate, clip):
    module = Tiny()
    t = trainer(
        MixedPrecisionPlugin(), max_steps=3, accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
    )  # fmt: skip
    t.fit(module, tiny_loader())
    assert t.global_step == 3
    assert same(params_of(module), engine_loop(accumulate, clip, steps=3))


def test_manual_optimization_with_clipping_matches_the_engine_loop():
    class Manual(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            opt.step()

    module = Manual()
    trainer(MixedPrecisionPlugin(), max_steps=3).fit(module, tiny_loader())
    assert same(params_of(module), engine_loop(1, 0.05, steps=3, unscale=True))


def test_validate_outside_fit_runs_half_and_leaves_the_exact_fp32_weights():
    class Validated(Tiny):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    module = Validated()
    fp32 = params_of(module)
    dtypes = []
    module.on_validation_batch_start = lambda *a: dtypes.append(module.net[0].weight.dtype)
    (metrics,) = trainer(MixedPrecisionPlugin()).validate(module, tiny_loader(n=16))
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert 0 < metrics["val_loss"] < 10
    assert same(params_of(module), fp32)


# -- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("flat_master", [False, True])
def test_resume_from_a_checkpoint_gives_the_same_numbers(tmp_path, flat_master):
    # the scale moves within a run
    options = {"growth_interval": 3, "init_scale": 2.0**10, "flat_master": flat_master}
    # 8 batches an epoch; an inf in epoch 1 (step 2), so the scaler state matters
    straight = Tiny(inf_at=(2,), schedule=False)
    trainer(MixedPrecisionPlugin(**options), max_epochs=2).fit(straight, tiny_loader())

    first = Tiny(inf_at=(2,))
    t1 = trainer(MixedPrecisionPlugin(**options), max_epochs=1)
    t1.fit(first, tiny_loader())
    path = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)
    engine = t1.precision_plugin.optimizer
    masters = list(engine.master_values().values())
    assert same([ckpt["state_dict"][n] for n, _ in first.named_parameters()], masters)
    assert "masters" not in ckpt["optimizer_states"][0]  # stored once, in state_dict
    assert ckpt["optimizer_states"][0]["scaler"]["skipped_steps"] == 1
    assert ckpt["MixedPrecisionPlugin"] == {"mode": "master", "dtype": "torch.bfloat16"}
    fp32 = make_net()
    fp32.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()})

    resumed = Tiny(seed=5)  # other weights: all of them must come from the checkpoint
    plugin = MixedPrecisionPlugin(**options)
    trainer(plugin, max_epochs=2).fit(resumed, tiny_loader(), ckpt_path=path)
    assert plugin.skipped_steps == 1
    assert same(params_of(resumed), params_of(straight))


def test_a_checkpoint_of_another_mode_is_refused(tmp_path):
    t1 = trainer(MixedPrecisionPlugin(), max_steps=1)
    t1.fit(Tiny(), tiny_loader())
    t1.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"saved by MixedPrecisionPlugin\(mode='master'"):
        trainer(MixedPrecisionPlugin(mode="autocast"), max_steps=2).fit(
            Tiny(), tiny_loader(), ckpt_path=tmp_path / "m.ckpt"
        )


# -- autocast mode, fp16 ------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_autocast_mode_keeps_the_model_fp32_and_skips_too(fused):
    snaps = Snapshots()
    plugin = MixedPrecisionPlugin(torch.bfloat16, mode="autocast", fused=fused)
    module = Tiny(inf_at=(1,))
    trainer(plugin, max_steps=3, callbacks=[snaps]).fit(module, tiny_loader())
    assert isinstance(plugin.optimizer, AutocastOptimizer)
    assert plugin.optimizer.fused is fused  # torch's fused Adam(W) kernel, when asked
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert snaps.skipped == [False, True, False]
    assert same(snaps.before[1], snaps.after[1])
    with plugin.forward_context():
        assert module(torch.randn(2, 8)).dtype == torch.bfloat16


def test_fp16_master_mode_trains_half_and_skips():
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.net[0].weight.dtype)

    plugin = MixedPrecisionPlugin(torch.float16, loss_scale=128.0)
    module = Tiny(inf_at=(0,))
    trainer(plugin, max_steps=2, callbacks=[Watch()]).fit(module, tiny_loader(n=16))
    assert seen == [torch.float16, torch.float16]
    assert plugin.skipped_steps == 1 and plugin.scale == 128.0  # static: the scale stays
    assert next(module.parameters()).dtype == torch.float32


# -- refused configurations ---------------------------------------------------------------
def test_bad_options_are_refused_at_once():
    with pytest.raises(ValueError, match="mode must be one of"):
        MixedPrecisionPlugin(mode="mixed")
    with pytest.raises(ValueError, match=r"flat_master.*mode='autocast' does not keep"):
        MixedPrecisionPlugin(mode="autocast", flat_master=True)
    with pytest.raises(ValueError, match="growth_factor must be >= 1"):
        MixedPrecisionPlugin(growth_factor=0.5)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        MixedPrecisionPlugin("bf16")


def test_two_optimizers_are_refused():
    class Two(Tiny):
        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters()),
                torch.optim.SGD(self.net[3].parameters()),
            ]

        @property
        def automatic_optimization(self):
            return False

    with pytest.raises(ValueError, match="drives one optimizer; configure_optimizers"):
        trainer(MixedPrecisionPlugin(), max_steps=1).fit(Two(), tiny_loader())


# -- Fabric ---------------------------------------------------------------------------------
def test_fabric_matches_the_engine_loop():
    plugin = MixedPrecisionPlugin()
    fabric = L.Fabric(accelerator="cpu", plugins=[plugin])
    net = make_net()
    model, opt = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
    for _, (x, y) in zip(range(3), tiny_loader()):
        fabric.backward(F.cross_entropy(model(x), y))  # the first before the engine exists
        assert opt.step() is True
        opt.zero_grad()
    masters = [m.detach() for group in plugin.optimizer.master_params for m in group]
    assert same(masters, engine_loop(1, None, steps=3))


def test_fabric_loop_steps_skips_and_restores(tmp_path):
    plugin = MixedPrecisionPlugin(torch.bfloat16)
    fabric = L.Fabric(accelerator="cpu", plugins=[plugin])
    net = make_net()
    fp32 = params_of(net)
    model, opt = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
    applied = []
    for step, (x, y) in enumerate(tiny_loader(n=32)):
        fabric.backward(F.cross_entropy(model(x), y))
        if step == 1:
            net[0].weight.grad[0, 0] = float("nan")
        applied.append(opt.step())
        opt.zero_grad()
    assert applied == [True, False, True, True]
    assert plugin.last_overflow.names == ["0.weight"]
    assert next(net.parameters()).dtype == torch.bfloat16
    assert not same([m.detach() for g in plugin.optimizer.master_params for m in g], fp32)

    fabric.save(tmp_path / "f.ckpt", {"model": model, "mixprec": plugin})
    plugin2 = MixedPrecisionPlugin(torch.bfloat16)
    fabric2 = L.Fabric(accelerator="cpu", plugins=[plugin2])
    net2 = make_net(seed=3)
    model2, opt2 = fabric2.setup(net2, torch.optim.AdamW(net2.parameters(), lr=1e-2))
    fabric2.load(tmp_path / "f.ckpt", {"model": model2, "mixprec": plugin2})
    for x, y in tiny_loader(n=8):
        fabric.backward(F.cross_entropy(model(x), y))
        fabric2.backward(F.cross_entropy(model2(x), y))
        assert opt.step() and opt2.step()
    masters = [
        [m.detach() for g in p.optimizer.master_params for m in g] for p in (plugin, plugin2)
    ]
    assert same(*masters)


# -- DDP ------------------------------------------------------------------------------------
class Record(L.Callback):
    """Per rank: which steps were skipped, the first masters and the last weights, saved to
    `out/rank{r}.pt` (the ranks are forked processes)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.skipped: list[bool] = []
        self.first_masters: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.first_masters:
            opt = trainer.optimizers[0]
            self.first_masters = [m.detach().clone() for g in opt.param_groups for m in g["params"]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.skipped.append(trainer.precision_plugin.step_was_skipped)

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"skipped": self.skipped, "first_masters": self.first_masters}
        state["params"] = [
            p.detach().clone() for p in trainer.optimizers[0].param_groups[0]["params"]
        ]
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


class PerRankSeed(Tiny):
    """Each rank starts from other weights (seed = rank): the masters must be rank 0's."""

    def setup(self, stage: str) -> None:
        self.net.load_state_dict(make_net(seed=self.global_rank).state_dict())


def test_ddp_two_processes_step_and_skip_together(tmp_path):
    module = PerRankSeed(inf_at=(1,), inf_rank=1)  # the inf on rank 1 only
    t = trainer(
        MixedPrecisionPlugin(torch.bfloat16), devices=2, strategy="ddp_fork", max_steps=3,
        callbacks=[Record(tmp_path)],
    )  # fmt: skip
    t.fit(module, tiny_loader(n=48))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["skipped"] for r in ranks] == [[False, True, False]] * 2
    assert same(ranks[0]["params"], ranks[1]["params"])
    assert same(ranks[0]["first_masters"], ranks[1]["first_masters"])
    assert same(ranks[0]["first_masters"], params_of(make_net(seed=0)))  # rank 0's fp32
