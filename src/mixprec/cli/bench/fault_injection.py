"""Fault injection into the engine: inf/nan in gradients, losses and inputs, checked bit for
bit against the run that should result.

`run_faults(config, faults, steps)` trains a tiny half model twice on the same batches:
once with the faults injected, once (the reference) fault-free, where each faulted step is
replaced by what a skipped step must be, a scaler update that records an overflow and
nothing else. After every step the two must hold identical fp32 masters, model weights,
optimizer state and scaler state; every faulted step must be skipped, every clean one
applied; and the skipped step's overflow report must name the parameters that were hit.
Under `torch.distributed` (2 ranks) a fault may hit one rank only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.core.convert import model_to_half
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.parallel.distributed import DistEnv, accumulate, unwrap, wrap_ddp

__all__ = [
    "CONFIGS",
    "KINDS",
    "EngineConfig",
    "Fault",
    "RunResult",
    "PARAM_NAMES",
    "batch",
    "make_model",
    "run_faults",
    "schedule",
]

KINDS = ("grad", "loss", "input")
"""Fault kinds a schedule draws from by default; "norm" (finite bf16 gradients whose global
norm overflows fp32) is drawn by the configurations that name it."""
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
GLOBAL_BATCH = 8  # samples per step, over all ranks
ONE_PROCESS = DistEnv()
PARAM_NAMES = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


@dataclass(frozen=True)
class Fault:
    """One injected fault at `step`: "grad" writes `value` into element `index` of the half
    gradient of trainable parameter `param` (after backward, so after DDP's all-reduce);
    "loss" multiplies the loss by `value`; "input" writes `value` into element `index` of
    the input; "norm" fills the whole half gradient of `param` with the finite `value`, so
    that the global norm overflows fp32 (bf16 only). `rank`: the one rank it hits (None:
    every rank)."""

    step: int
    kind: str = "grad"
    param: int = 0
    index: int = 0
    value: float = float("inf")
    rank: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine under test is built."""

    name: str
    flat_master: bool = False
    fused: bool = False
    clip: float | None = None
    loss_scale: float | str = "dynamic"
    micro_batches: int = 1
    optimizer: str = "adamw"  # or "sgd" (momentum)
    dtype: str = "fp16"  # or "bf16"
    kinds: tuple[str, ...] = KINDS  # the fault kinds its schedules draw

    def build(self, model: nn.Module) -> MixedPrecisionOptimizer:
        """The engine over `model`'s parameters (named after `model`)."""
        params = model.parameters()
        inner = (
            torch.optim.AdamW(params, lr=1e-2)
            if self.optimizer == "adamw"
            else torch.optim.SGD(params, lr=0.1, momentum=0.9)
        )
        return MixedPrecisionOptimizer(
            inner,
            self.loss_scale,
            flat_master=self.flat_master,
            fused=self.fused,
            clip=self.clip,
            init_scale=2.0**12,
            growth_interval=3,  # the scale grows during a run, so skips move it both ways
            model=model,
        )


CONFIGS: tuple[EngineConfig, ...] = (
    EngineConfig("per-tensor"),
    EngineConfig("flat", flat_master=True),
    EngineConfig("fused", fused=True),
    EngineConfig("fused flat clip", flat_master=True, fused=True, clip=1.0),
    EngineConfig("per-tensor clip static", clip=0.5, loss_scale=256.0, optimizer="sgd"),
    EngineConfig("flat accumulate 2", flat_master=True, micro_batches=2, optimizer="sgd"),
    EngineConfig("bf16 clip, norm overflow", fused=True, clip=1.0, dtype="bf16", kinds=("norm",)),
)


@dataclass
class RunResult:
    """What one run with faults did, beside its reference."""

    config: str
    steps: int
    faults: int  # faults injected (on any rank)
    faulted_steps: int  # steps with at least one fault: each must be skipped
    skipped: int  # steps the run skipped
    lost: int  # clean steps whose update did not land
    mismatches: list[str] = field(default_factory=list)  # "step 3: masters" ...
    misnamed: list[str] = field(default_factory=list)  # overflow reports that named wrongly
    masters: torch.Tensor | None = None  # the run's fp32 masters at the end, flattened

    @property
    def ok(self) -> bool:
        """Every faulted step skipped as a no-op, every clean step applied, reports right."""
        return (
            self.skipped == self.faulted_steps
            and self.lost == 0
            and not self.mismatches
            and not self.misnamed
        )


def make_model(seed: int = 0, dtype: str = "fp16") -> nn.Module:
    """A tiny MLP with a LayerNorm (kept in fp32), in fp16 (or bf16)."""
    torch.manual_seed(seed)
    return model_to_half(
        nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)),
        HALF[dtype],
    )


def batch(step: int, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    n = GLOBAL_BATCH // env.world_size
    return x[env.rank * n : (env.rank + 1) * n], y[env.rank * n : (env.rank + 1) * n]


def _state(model: nn.Module, opt: MixedPrecisionOptimizer) -> dict[str, Any]:
    """Copies of everything a step may change."""
    inner = opt.optimizer
    return {
        "masters": [m.detach().clone() for g in opt.master_params for m in g],
        "model": [v.detach().clone() for v in unwrap(model).state_dict().values()],
        "optimizer": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[m].items()}
            for g in opt.master_params
            for m in g
            if m in inner.state
        ],
        "scaler": opt.scaler.state_dict(),
    }


def _differs(a: Any, b: Any) -> bool:
    if torch.is_tensor(a):
        return not (torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def _hits(fault: Fault, env: DistEnv) -> bool:
    return fault.rank is None or fault.rank == env.rank


def _micro_batch(fault: Fault, n: int, env: DistEnv) -> int:
    """The micro-batch after whose backward `fault` is injected: a gradient fault under DDP
    after the last (the reducing) backward, so that it stays on its rank."""
    if fault.kind in ("grad", "norm"):
        return n - 1 if env.is_distributed else fault.index % n
    return 0


def _train_step(
    model: nn.Module,
    opt: MixedPrecisionOptimizer,
    config: EngineConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    faults: Sequence[Fault] = (),
    env: DistEnv = ONE_PROCESS,
) -> bool:
    """One step over `config.micro_batches` micro-batches, with `faults` injected."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    n = config.micro_batches
    chunks = list(zip(x.chunk(n), y.chunk(n)))
    for i, (xb, yb) in enumerate(accumulate(model, chunks)):
        xb = xb.clone()
        mine = [f for f in faults if _micro_batch(f, n, env) == i]
        for f in mine:
            if f.kind == "input":
                xb.view(-1)[f.index % xb.numel()] = f.value
        loss = F.cross_entropy(model(xb.to(HALF[config.dtype])).float(), yb) / len(chunks)
        for f in mine:
            if f.kind == "loss":
                loss = loss * f.value
        opt.backward(loss)
        with torch.no_grad():
            for f in mine:
                if f.kind == "grad":
                    grad = params[f.param % len(params)].grad
                    grad.view(-1)[f.index % grad.numel()] = f.value
                if f.kind == "norm":
                    params[f.param % len(params)].grad.fill_(f.value)
    applied = opt.step()
    opt.zero_grad()
    return applied


def _named_wrong(
    opt: MixedPrecisionOptimizer, faults: Sequence[Fault], hits: Sequence[Fault], step: int
) -> str | None:
    """Why the overflow report of `step` is wrong, given the step's `faults` on every rank
    and those that `hits` this one."""
    report = opt.last_overflow
    if report is None or report.step != step:
        return f"step {step}: no overflow report"
    if all(f.kind == "norm" for f in faults):  # finite gradients: only the norm overflowed
        return None if report.norm_overflow else f"step {step}: the norm overflow not said"
    if any(f.kind != "grad" for f in faults):  # backward spreads it (DDP: to every rank)
        return None if report.faults else f"step {step}: an inf/nan loss or input named nothing"
    expected = sorted({PARAM_NAMES[f.param % len(PARAM_NAMES)] for f in hits})
    if sorted(report.names) != expected:
        return f"step {step}: named {report.names}, expected {expected}"
    return None


def run_faults(
    config: EngineConfig, faults: Sequence[Fault], steps: int, env: DistEnv = ONE_PROCESS
) -> RunResult:
    """Train `steps` steps with `faults` and, beside it, the reference; compare after each.

    Under torch.distributed every rank must call it with the same arguments.
    """
    model = wrap_ddp(make_model(dtype=config.dtype))
    opt = config.build(model)
    ref_model = wrap_ddp(make_model(dtype=config.dtype))
    ref = config.build(ref_model)
    faulted = {f.step for f in faults}
    result = RunResult(config.name, steps, len(faults), len(faulted), 0, 0)
    for step in range(steps):
        x, y = batch(step, env)
        now = [f for f in faults if f.step == step]
        hits = [f for f in now if _hits(f, env)]
        applied = _train_step(model, opt, config, x, y, hits, env)
        result.skipped += not applied
        if step in faulted:
            ref.scaler.update(True)  # what a skipped step must do, and nothing else
            wrong = _named_wrong(opt, now, hits, step)
            if wrong is not None:
                result.misnamed.append(wrong)
        else:
            _train_step(ref_model, ref, config, x, y)
        got, expected = _state(model, opt), _state(ref_model, ref)
        differ = [key for key in expected if _differs(got[key], expected[key])]
        result.mismatches += [f"step {step}: {key}" for key in differ]
        if step not in faulted and (differ or not applied):
            result.lost += 1
    result.masters = torch.cat([m.detach().reshape(-1) for g in opt.master_params for m in g])
    return result


def schedule(
    rng: random.Random, steps: int, n_faults: int, kinds: Sequence[str] = KINDS, world_size: int = 1
) -> list[Fault]:
    """`n_faults` random faults over `steps` steps (a step may get several), each on one
    random rank (or every rank, one time in four) when `world_size` > 1."""
    values = (float("inf"), float("-inf"), float("nan"))
    faults = []
    for _ in range(n_faults):
        rank = None
        if world_size > 1 and rng.random() < 0.75:
            rank = rng.randrange(world_size)
        step, kind = rng.randrange(steps), rng.choice(kinds)
        param, index, value = (
            rng.randrange(len(PARAM_NAMES)),
            rng.randrange(1 << 16),
            rng.choice(values),
        )
        if kind == "norm":
            value = 1e25  # finite in bf16; the squares overflow fp32
        faults.append(Fault(step, kind, param, index, value, rank))
    return sorted(faults, key=lambda f: f.step)
