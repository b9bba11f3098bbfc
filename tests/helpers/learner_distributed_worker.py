"""Runs on every rank of a 2-process gloo launch by test_learner_distributed.py, as torchrun
would start it (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment; the Learner joins the
process group itself).

Usage: python learner_distributed_worker.py OUT_DIR  -> OUT_DIR/rank{RANK}.pt
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.accumulate_worker import accumulate
from helpers.learner import snapshot
from mixprec import Callback, DataBunch, Learner, accuracy
from mixprec.parallel.distributed import cleanup_distributed, read_env

N_TRAIN, N_VALID = 64, 33  # the valid shards are uneven: 17 and 16 samples
BATCH = 8  # per rank: 4 steps per epoch on 2 ranks
INIT_SEED = 100  # rank r builds its model from INIT_SEED + r; the Learner starts from rank 0's
DYNAMIC = {"loss_scale": "dynamic", "init_scale": 2.0**10, "growth_interval": 3}
POISONED_STEP = 2


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes from the signs of two of eight features."""
    x = torch.randn(N_TRAIN + N_VALID, 8, generator=torch.Generator().manual_seed(0))
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def data() -> DataBunch:
    x, y = tensors()
    train = DataLoader(
        TensorDataset(x[:N_TRAIN], y[:N_TRAIN]),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
    )
    valid = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=16)
    return DataBunch(train, valid, device="cpu")


def net(seed: int) -> nn.Module:
    """BatchNorm (per-rank statistics) and Dropout (per-rank random state) on purpose."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)
    )


def make(path: Path, seed: int) -> Learner:
    return Learner(data(), net(seed), metrics=[accuracy], path=path, progress=False)


def masters(learn: Learner) -> torch.Tensor:
    return torch.cat([m.detach().reshape(-1) for g in learn.opt.master_params for m in g])


class Watch(Callback):
    """Records each batch's inputs, the masters at the first step, and around step `at` the
    masters, poisoning rank-local gradients there if `poison`."""

    order = 50  # after the backward (DDP has reduced), before MixedPrecision's unscale_

    def __init__(self, at: int = -1, poison: bool = False) -> None:
        self.at, self.poison = at, poison
        self.inputs: list[torch.Tensor] = []
        self.first: torch.Tensor | None = None
        self.around: list[torch.Tensor] = []

    def on_batch_begin(self, learn: Learner, last_input: Any, iteration: int, train: bool, **kw):
        if not train:  # validate()'s batches
            return
        self.inputs.append(last_input.float().clone())
        if self.first is None:
            self.first = masters(learn)
        if iteration == self.at:
            self.around.append(masters(learn))

    def on_backward_end(self, learn: Learner, iteration: int, **kwargs) -> None:
        if self.poison and iteration == self.at:
            next(learn.model.parameters()).grad.view(-1)[0] = float("inf")

    def on_batch_end(self, learn: Learner, iteration: int, **kwargs) -> None:
        if iteration == self.at:
            self.around.append(masters(learn))


def identical(rank: int, out: Path) -> dict[str, Any]:
    """Different inits per rank, and rank 1's weights changed again before to_fp16: every
    rank must still train rank 0's weights; validation before and after; fp32 and autocast."""
    learn = make(out, INIT_SEED + rank)
    init = [p.detach().clone() for p in learn.model.parameters()]
    valid_before = learn.validate()
    if rank == 1:
        with torch.no_grad():
            for p in learn.model.parameters():
                p.add_(1.0)
    learn.to_fp16(**DYNAMIC)
    watch = Watch()
    learn.add_cb(watch)
    learn.fit(2)
    fp32 = make(out, INIT_SEED + rank)
    fp32.fit(1)
    autocast = make(out, INIT_SEED + rank).to_fp16(mode="autocast", **DYNAMIC)
    autocast.fit(1)
    return {
        "init": init,
        "valid_before": valid_before,
        "first_masters": watch.first,
        "inputs": watch.inputs,
        "state": snapshot(learn),
        "recorder": learn.recorder.state_dict(),
        "valid": learn.validate(),
        "fp32": snapshot(fp32),
        "autocast": {"state": snapshot(autocast), "scales": autocast.recorder.loss_scales},
        "sampler": type(learn.data.train_dl.dl.sampler).__name__,
    }


def skip(rank: int, out: Path) -> dict[str, Any]:
    """An inf in rank 1's (already reduced) gradient at one step."""
    learn = make(out, INIT_SEED)
    learn.to_fp16(**DYNAMIC)
    watch = Watch(at=POISONED_STEP, poison=rank == 1)
    learn.add_cb(watch)
    learn.fit(1)
    return {
        "skipped": learn.recorder.skipped,
        "scales": learn.recorder.loss_scales,
        "around": watch.around,
        "state": snapshot(learn),
    }


def resume(rank: int, out: Path) -> dict[str, Any]:
    """fit(1), save, fit(1); then a fresh learner (another init) loads and fits 1 epoch."""
    learn = make(out, INIT_SEED + rank).to_fp16(flat_master=True, **DYNAMIC)
    learn.fit(1)
    rng_at_save = torch.get_rng_state()
    path = learn.save("epoch1")
    learn.fit(1)
    straight = {"state": snapshot(learn), "recorder": learn.recorder.state_dict()}

    learn = make(out, 999 + rank).to_fp16(flat_master=True, **DYNAMIC).load("epoch1")
    rng_after_load = torch.get_rng_state()
    learn.fit(1)
    resumed = {"state": snapshot(learn), "recorder": learn.recorder.state_dict()}
    return {
        "straight": straight,
        "resumed": resumed,
        "rng_at_save": rng_at_save,
        "rng_after_load": rng_after_load,
        "files": sorted(p.name for p in path.parent.iterdir()),
        "rng_ranks": len(torch.load(path, weights_only=True)["rng_ranks"]),
    }


SCENARIOS = {f.__name__: f for f in (identical, skip, resume, accumulate)}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = read_env().rank
    results = {name: scenario(rank, out / name) for name, scenario in SCENARIOS.items()}
    torch.save(results, out / f"rank{rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
