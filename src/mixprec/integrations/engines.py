"""Framework-free glue for integrations: the engine around a framework's optimizer, with fp32
masters taken from the exact fp32 weights, and the masters by parameter name.

A framework (Lightning) converts the model before it builds the optimizer, so the optimizer
holds half parameters: `exact_fp32_values` keeps the fp32 values before `model_to_half`
rounds them, and `wrap_optimizer` copies them into the new masters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixprec.core.master import load_masters_, master2model, master_views
from mixprec.core.modes import Mode
from mixprec.core.scaler import LossScale
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.parallel.distributed import is_data_parallel

__all__ = [
    "Engine",
    "exact_fp32_values",
    "masters_by_param",
    "wrap_optimizer",
]

Engine = MixedPrecisionOptimizer | AutocastOptimizer

ExactValues = dict[torch.Tensor, torch.Tensor]
"""Parameter -> its fp32 value (keyed by the parameter object, which hashes by identity)."""


def exact_fp32_values(model: nn.Module) -> ExactValues:
    """The fp32 value of each fp32 parameter of `model`, kept before a conversion rounds it.

    No copy: `model_to_half` gives each parameter new `.data`, and these references keep the
    old fp32 storage alive until the masters have taken it."""
    return {p: p.detach() for p in model.parameters() if p.dtype == torch.float32}


def wrap_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    mode: Mode,
    dtype: torch.dtype,
    loss_scale: LossScale,
    flat_master: bool,
    clip: float | None,
    fused: bool,
    exact: ExactValues,
    scaler_options: dict[str, Any],
) -> Engine:
    """The engine of `mode` around `optimizer` (built on `model`, already converted).

    Mode "master": a `MixedPrecisionOptimizer` whose masters hold the `exact` fp32 values, not
    the rounded half ones; in data-parallel runs every rank takes rank 0's masters, as DDP
    gives every rank rank 0's weights. (When the engine takes an optimizer built on the fp32
    model, `MixedPrecisionOptimizer(opt, model=..., dtype=...)`, this is where to switch.)
    """
    if mode == "autocast":
        return AutocastOptimizer(
            optimizer, loss_scale, dtype=dtype, clip=clip, fused=fused, **scaler_options
        )
    engine = MixedPrecisionOptimizer(
        optimizer,
        loss_scale,
        flat_master=flat_master,
        clip=clip,
        fused=fused,
        model=model,  # names the parameters in overflow reports
        **scaler_options,
    )
    exact_by_id = {id(p): v for p, v in exact.items()}
    load_masters_(engine.model_params, engine.master_params, engine.flat_master, exact_by_id)
    with torch.no_grad():
        if is_data_parallel():
            for group in engine.master_params:
                for m in group:
                    torch.distributed.broadcast(m.data, src=0)
        master2model(engine.model_params, engine.master_params, engine.flat_master)
    return engine


def masters_by_param(engine: MixedPrecisionOptimizer) -> ExactValues:
    """Each model parameter's fp32 master value (a view, no copy)."""
    return {
        p: v
        for params, masters in zip(engine.model_params, engine.master_params)
        for p, v in zip(params, master_views(params, masters, engine.flat_master))
    }
