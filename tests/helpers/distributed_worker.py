"""Runs on every rank of a 2-process gloo group started by test_distributed.py, as torchrun
would start it (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment).

Usage: python distributed_worker.py OUT_DIR  -> OUT_DIR/rank{RANK}.pt, the scenarios' results.
The helpers also build the single-process references in the test itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import functional as F

from mixprec import LossScaler, MixedPrecisionOptimizer, model_to_half
from mixprec.parallel.distributed import (
    DistEnv,
    accumulate,
    cleanup_distributed,
    init_distributed,
    save_on_rank0,
    unwrap,
    wrap_ddp,
)

GLOBAL_BATCH = 8  # samples per step over all ranks: 4 per rank on 2 ranks
INIT_SEED = 100
ONE_PROCESS = DistEnv()


def make_net(seed: int = INIT_SEED) -> nn.Module:
    """A tiny MLP with a LayerNorm, which model_to_half keeps in fp32."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of `step` (all of it for world_size=1)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    per_rank = GLOBAL_BATCH // world_size
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def masters(opt: MixedPrecisionOptimizer) -> torch.Tensor:
    """All fp32 masters, flattened into one tensor (a copy)."""
    return torch.cat([m.detach().reshape(-1) for group in opt.master_params for m in group])


def model_values(model: nn.Module) -> torch.Tensor:
    """Every parameter and buffer of the (unwrapped) model, in fp32 (exact for half values)."""
    state = unwrap(model).state_dict()
    return torch.cat([v.detach().float().reshape(-1) for v in state.values()])


def poison_grad_(model: nn.Module) -> None:
    """Write an inf into the first parameter's gradient (after DDP reduced it)."""
    next(unwrap(model).parameters()).grad.view(-1)[0] = float("inf")


def train(
    model: nn.Module,
    opt: MixedPrecisionOptimizer,
    steps: range,
    *,
    env: DistEnv = ONE_PROCESS,
    micro_batches: int = 1,
    poison: Callable[[int], bool] = lambda step: False,
) -> list[tuple[bool, float]]:
    """Train on `steps`; return (step applied, loss scale after it) per step."""
    log = []
    for step in steps:
        x, y = batch(step, env.rank, env.world_size)
        chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
        for xb, yb in accumulate(model, chunks):
            loss = F.cross_entropy(model(xb.half()).float(), yb) / len(chunks)
            opt.backward(loss)
        if poison(step):
            poison_grad_(model)
        applied = opt.step()
        opt.zero_grad()
        log.append((applied, opt.loss_scale))
    return log


def sgd_run(model: nn.Module, **options: Any) -> MixedPrecisionOptimizer:
    """The optimizer of the runs compared with a single process."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return MixedPrecisionOptimizer(sgd, "dynamic", init_scale=2.0**10, **options)


def adamw_run(model: nn.Module, **options: Any) -> MixedPrecisionOptimizer:
    """The optimizer of the runs compared across ranks: state, and a scale that moves."""
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return MixedPrecisionOptimizer(adamw, "dynamic", init_scale=2.0**8, **options)


def recording_hook(record: list[tuple[str, int]]) -> Callable:
    """A DDP communication hook that records each bucket's dtype and bytes, then all-reduces
    it as DDP's default does."""

    def hook(state, bucket):  # DDP checks these annotations: leave them out
        buffer = bucket.buffer()
        record.append((str(buffer.dtype), buffer.numel() * buffer.element_size()))
        return default_hooks.allreduce_hook(None, bucket)

    return hook


# -- scenarios: each returns plain values (loaded with weights_only=True) ---------------------
def identical(env: DistEnv, out: Path) -> dict[str, Any]:
    """Different initial weights per rank (DDP broadcasts rank 0's); AdamW, scale growing;
    flat masters and DDP's gradient_as_bucket_view, each on and off."""
    result = {}
    for flat, bucket_view in ((False, False), (True, False), (False, True), (True, True)):
        net = model_to_half(make_net(INIT_SEED + env.rank))
        model = wrap_ddp(net, gradient_as_bucket_view=bucket_view)
        opt = adamw_run(model, flat_master=flat, growth_interval=2)
        log = train(model, opt, range(6), env=env)
        result[f"flat={flat},bucket_view={bucket_view}"] = {
            "masters": masters(opt),
            "model": model_values(model),
            "log": log,
        }
    return result


def buckets(env: DistEnv, out: Path) -> dict[str, Any]:
    """Dtype and bytes of each bucket DDP all-reduces, for half models and the fp32 model."""
    result = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        net = make_net()
        if dtype != torch.float32:
            model_to_half(net, dtype)
        model = wrap_ddp(net)
        reduced: list[tuple[str, int]] = []
        model.register_comm_hook(None, recording_hook(reduced))
        x, y = batch(0, env.rank, env.world_size)
        F.cross_entropy(model(x.to(dtype)).float(), y).backward()
        numel = {str(d): 0 for d in (torch.float16, torch.bfloat16, torch.float32)}
        for p in net.parameters():
            numel[str(p.dtype)] += p.numel()
        result[str(dtype)] = {"reduced": reduced, "numel": numel}
    return result


def accumulation(env: DistEnv, out: Path) -> dict[str, Any]:
    """2 micro-batches per step under no_sync; and opted out of data-parallel accumulation."""
    result = {}
    for data_parallel in (True, False):
        model = wrap_ddp(model_to_half(make_net()))
        reductions: list[tuple[str, int]] = []
        model.register_comm_hook(None, recording_hook(reductions))
        opt = sgd_run(model, data_parallel=data_parallel)
        log = train(model, opt, range(4), env=env, micro_batches=2)
        result[f"data_parallel={data_parallel}"] = {
            "masters": masters(opt),
            "log": log,
            "reductions": len(reductions),
        }
    return result


def match(env: DistEnv, out: Path) -> dict[str, Any]:
    """b samples per rank, to compare with one process on 2b."""
    model = wrap_ddp(model_to_half(make_net()))
    opt = sgd_run(model, flat_master=True)
    log = train(model, opt, range(6), env=env)
    return {"masters": masters(opt), "log": log}


def skip(env: DistEnv, out: Path) -> dict[str, Any]:
    """An inf in rank 1's reduced gradient at step 2 and in rank 1's input at step 3."""
    result = {}
    for data_parallel in (True, False):
        model = wrap_ddp(model_to_half(make_net()))
        opt = adamw_run(model, data_parallel=data_parallel)
        before = []

        def poison(step: int, opt: MixedPrecisionOptimizer = opt, before: list = before) -> bool:
            before.append(masters(opt))
            return env.rank == 1 and step == 2

        log = train(model, opt, range(3), env=env, poison=poison)
        after_skip = masters(opt)
        x, y = batch(3, env.rank, env.world_size)
        if env.rank == 1:
            x[0, 0] = float("inf")
        opt.backward(F.cross_entropy(model(x.half()).float(), y))
        log.append((opt.step(), opt.loss_scale))
        opt.zero_grad()
        result[f"data_parallel={data_parallel}"] = {
            "log": log,
            "before_step2": before[2],
            "after_step2": after_skip,
            "final": masters(opt),
            "skipped": opt.skipped_steps,
        }
    return result


def resume(env: DistEnv, out: Path) -> dict[str, Any]:
    """Save on rank 0 after 3 of 6 steps, then resume fresh objects on both ranks from it."""
    path = out / "resume.pt"
    model = wrap_ddp(model_to_half(make_net(INIT_SEED + env.rank)))
    opt = adamw_run(model, flat_master=True, growth_interval=2)
    train(model, opt, range(3), env=env)
    save_on_rank0({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict()}, path)
    train(model, opt, range(3, 6), env=env)
    straight = {
        "masters": masters(opt),
        "model": model_values(model),
        "scaler": opt.scaler.state_dict(),
    }

    model = wrap_ddp(model_to_half(make_net(999 + env.rank)))
    opt = adamw_run(model, flat_master=True, growth_interval=2)
    checkpoint = torch.load(path, weights_only=True)
    unwrap(model).load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    train(model, opt, range(3, 6), env=env)
    resumed = {
        "masters": masters(opt),
        "model": model_values(model),
        "scaler": opt.scaler.state_dict(),
    }
    try:  # rank 0 cannot write under a file: every rank raises, none waits forever
        save_on_rank0({"w": torch.ones(1)}, path / "under_a_file.pt")
        failed = None
    except Exception as e:
        failed = type(e).__name__
    return {"straight": straight, "resumed": resumed, "failed_save": failed}


def fsdp(env: DistEnv, out: Path) -> dict[str, Any]:
    """FSDP2 with mixprec's policy and scaler beside DDP with MixedPrecisionOptimizer: SGD,
    clipping, an inf in rank 1's gradient (its own shard under FSDP2) at step 2."""
    from mixprec.parallel.fsdp import fully_shard_half, scaled_step

    model = fully_shard_half(make_net(), torch.float16)  # same init on every rank: no broadcast
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scaler = LossScaler("dynamic", init_scale=2.0**10)
    log, dtypes = [], set()
    for step in range(5):
        x, y = batch(step, env.rank, env.world_size)
        output = model(x)
        dtypes.add(str(output.dtype))
        scaler.scale_loss(F.cross_entropy(output.float(), y)).backward()
        if env.rank == 1 and step == 2:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
        log.append((scaled_step(sgd, scaler, clip=1.0), scaler.scale))
        sgd.zero_grad()
    full = torch.cat([p.detach().full_tensor().reshape(-1) for p in model.parameters()])
    shard_dtypes = sorted({str(p.dtype) for p in model.parameters()})

    ddp_model = wrap_ddp(model_to_half(make_net()))
    opt = sgd_run(ddp_model, clip=1.0)
    ddp_log = train(ddp_model, opt, range(5), env=env, poison=lambda s: env.rank == 1 and s == 2)
    return {
        "log": log,
        "params": full,
        "output_dtypes": sorted(dtypes),
        "shard_dtypes": shard_dtypes,
        "ddp_log": ddp_log,
        "ddp_masters": masters(opt),
    }


SCENARIOS = {f.__name__: f for f in (identical, buckets, accumulation, match, skip, resume, fsdp)}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    env = init_distributed("gloo", timeout=timedelta(seconds=60))
    results = {name: scenario(env, out) for name, scenario in SCENARIOS.items()}
    torch.save(results, out / f"rank{env.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
