"""The engine a `PrecisionConfig` asks for, around a framework's optimizer."""

from __future__ import annotations

import torch
from torch import nn

from mixprec.core.config import PrecisionConfig
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["Engine", "build_engine"]

Engine = MixedPrecisionOptimizer | AutocastOptimizer


def build_engine(
    config: PrecisionConfig, optimizer: torch.optim.Optimizer, model: nn.Module | None = None
) -> Engine:
    """`config.mode`'s engine around `optimizer`: a `MixedPrecisionOptimizer` ("master": an
    optimizer of the half `model`, or of the fp32 one, which it then converts) or an
    `AutocastOptimizer` ("autocast"). `model` names the parameters in overflow reports."""
    if config.mode == "autocast":
        return AutocastOptimizer(
            optimizer, config.loss_scale, dtype=config.dtype, clip=config.clip,
            fused=config.fused, model=model, **config.scaler_options,
        )  # fmt: skip
    return MixedPrecisionOptimizer(
        optimizer, config.loss_scale, flat_master=config.flat_master, clip=config.clip,
        fused=config.fused, master=config.master, model=model, **config.scaler_options,
    )  # fmt: skip
