"""Gradient accumulation on every rank of the 2-process launch of
learner_distributed_worker.py (its `accumulate` scenario): per dtype, 2 micro-batches of 4 per
step against one batch of 8, and whether DDP left the first micro-batch's gradients
unreduced (`no_sync`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mixprec import Callback, DataBunch, Learner

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make(batch_size: int, accumulate: int, dtype: torch.dtype | None) -> Learner:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    learn = Learner(DataBunch(train, device="cpu"), model, progress=False, accumulate=accumulate)
    return learn if dtype is None else learn.to_fp16(dtype=dtype)


def weights(learn: Learner) -> torch.Tensor:
    opt = learn.opt
    params = getattr(opt, "master_params", None) or [list(learn.model.parameters())]
    return torch.cat([p.detach().float().reshape(-1) for g in params for p in g])


class Grads(Callback):
    """The model's first weight gradient before each micro-batch and before each step."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_batch_begin(self, learn: Learner, num_batch: int, **kwargs: Any) -> None:
        if num_batch % 2 == 1:  # after the step's first backward
            self.seen.append(learn.model[0].weight.grad.clone())

    def on_backward_end(self, learn: Learner, **kwargs: Any) -> None:
        self.seen.append(learn.model[0].weight.grad.clone())


def accumulate(rank: int, out: Path) -> dict[str, Any]:
    """Per dtype, the weights after one epoch each way; the fp32 run's gradients."""
    result: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        large, accumulated = make(8, 1, dtype), make(4, 2, dtype)
        grads = Grads()
        large.fit(1, 1e-2)
        accumulated.fit(1, 1e-2, callbacks=[grads] if dtype is None else [])
        result[name] = {"large": weights(large), "accumulated": weights(accumulated)}
        if dtype is None:
            result["grads"] = grads.seen
            result["steps"] = accumulated.iteration
    return result
