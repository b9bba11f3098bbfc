"""Tiny LightningModules and Trainers for the plugin tests (and the DDP worker)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
}


def make_net(seed: int = 0) -> nn.Module:
    """A tiny MLP with a LayerNorm (kept fp32 by model_to_half)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 1) -> DataLoader:
    """A fixed (unshuffled) classification set of `n` samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Tiny(L.LightningModule):
    """AdamW (and optionally a per-step lr schedule) on `make_net`; `inf_at` injects an inf
    into net.0.weight's gradient at those optimizer steps (`inf_rank`: on that rank only)."""

    def __init__(
        self,
        seed: int = 0,
        inf_at: tuple[int, ...] = (),
        inf_rank: int | None = None,
        schedule: bool = False,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.net = make_net(seed)
        self.inf_at = set(inf_at)
        self.inf_rank = inf_rank
        self.schedule = schedule
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_after_backward(self) -> None:
        rank_ok = self.inf_rank is None or self.global_rank == self.inf_rank
        if self.global_step in self.inf_at and rank_ok:
            self.net[0].weight.grad[0, 0] = float("inf")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(plugin: Any = None, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer with `plugin`."""
    return L.Trainer(plugins=[plugin] if plugin is not None else None, **{**QUIET, **kwargs})
