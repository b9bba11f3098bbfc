"""Sharded data parallel: torch's FSDP2 (`fully_shard`) with mixprec's policy and loss scaling.

Under FSDP2 the sharded fp32 parameters are the master weights and `MixedPrecisionPolicy`
casts them to half for compute, so there is no `model_to_half` and no
`MixedPrecisionOptimizer`; mixprec adds its precision policy (norm layers in fp32) and the
loss scaler, whose overflow decision must be all-reduced since every rank holds other
shards::

    for block in model.blocks:
        fully_shard_half(block, torch.float16)     # blocks first, then the root
    fully_shard_half(model, torch.float16)
    opt = torch.optim.AdamW(model.parameters())    # steps the fp32 shards
    scaler = LossScaler("dynamic")
    for x, y in loader:
        scaler.scale_loss(loss_fn(model(x).float(), y)).backward()
        scaled_step(opt, scaler)                   # every rank steps or skips together
        opt.zero_grad()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.core.dtypes import check_half_dtype
from mixprec.core.policy import DEFAULT_FP32, PrecisionPolicy, Rule, as_policy
from mixprec.core.scaler import LossScaler, unscale_and_check_
from mixprec.parallel.distributed import all_reduce_overflow_

try:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

__all__ = ["fully_shard_half", "scaled_step"]


def _fp32_units(module: nn.Module, roots: set[int]) -> list[nn.Module]:
    """The kept-fp32 submodules (ids in `roots`), outside submodules already sharded."""
    found = []
    for child in module.children():
        if isinstance(child, FSDPModule):
            continue
        if id(child) in roots:
            found.append(child)
        else:
            found.extend(_fp32_units(child, roots))
    return found


def fully_shard_half(
    module: nn.Module,
    dtype: torch.dtype = torch.float16,
    *,
    keep_fp32: tuple[Rule, ...] | PrecisionPolicy = DEFAULT_FP32,
    reduce_dtype: torch.dtype | None = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Shard `module` with FSDP2's `fully_shard` to compute in `dtype` on fp32 sharded masters.

    Each submodule `keep_fp32` keeps in fp32 (`model_to_half`'s rules: the norm layers by
    type and by class name, e.g. a Llama's `LlamaRMSNorm`, and what an HF model declares in
    `_keep_in_fp32_modules`; or a `PrecisionPolicy`) not inside an already sharded submodule
    becomes its own unit that computes in fp32 and returns `dtype`, as under `model_to_half`;
    then `module` computes in `dtype`. Gradients are reduced in
    `reduce_dtype` (default `dtype`: half the bytes of fp32, as under DDP; torch.float32 for
    more accuracy) and land on the fp32 shards. `fsdp_kwargs` go to `fully_shard`
    (mesh, reshard_after_forward, ...). Returns `module`, sharded in place.
    """
    check_half_dtype(dtype)
    policy = as_policy(keep_fp32)
    roots = {id(m) for m, _ in policy.fp32_roots(module, dtype).values()}  # a bad rule raises
    reduce_dtype = dtype if reduce_dtype is None else reduce_dtype
    if "mp_policy" in fsdp_kwargs:
        raise TypeError(
            "fully_shard_half sets mp_policy itself from dtype, keep_fp32 and reduce_dtype; "
            "pass those, or call torch's fully_shard directly with your own policy."
        )
    fp32_policy = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype
    )
    for unit in _fp32_units(module, roots):
        fully_shard(unit, mp_policy=fp32_policy, **fsdp_kwargs)
    half_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
    fully_shard(module, mp_policy=half_policy, **fsdp_kwargs)
    return module


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that shares its storage); a tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def scaled_step(
    optimizer: torch.optim.Optimizer,
    scaler: LossScaler,
    *,
    clip: float | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> bool:
    """Unscale the fp32 (sharded) gradients of `optimizer` in place, check every rank's shard
    for inf/nan, and step unless any rank overflowed; update `scaler` and return whether the
    step was applied. `clip`: the max global gradient norm, over all shards.

    For models whose parameters are already fp32 masters (FSDP2 with a half compute policy);
    a half model's masters are `MixedPrecisionOptimizer`'s job.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [_local(p.grad) for p in params if p.grad is not None]
    found_inf = unscale_and_check_(grads, 1.0 / scaler.scale)
    if found_inf is None:  # this rank holds no gradient; it still joins the all-reduce
        device = params[0].device if params else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
    norm = None
    if clip is not None and hasattr(nn.utils, "get_total_norm"):
        # the global norm over every rank's shards; one that overflows fp32 (finite
        # gradients of ~1e19 and more) cannot be clipped: the step is skipped, as the
        # engine's is
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = _full(norm).to(found_inf.device)
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(norm)).reshape(1)))
    all_reduce_overflow_(found_inf, process_group)
    overflow = bool(found_inf.item())  # the one host sync of the step
    if not overflow:
        with_grads = [p for p in params if p.grad is not None]
        if norm is not None:
            nn.utils.clip_grads_with_norm_(with_grads, clip, norm)
        elif clip is not None:  # torch < 2.6
            nn.utils.clip_grad_norm_(with_grads, clip)
        optimizer.step()
    scaler.update(overflow)
    return not overflow


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a norm reduced over the shards); a tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor
