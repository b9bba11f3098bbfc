"""What a wrapper built on an fp32 model's optimizer converts the model to, checked first."""

from __future__ import annotations

import torch
from torch import nn

from mixprec.core.checks import check_optimizer_holds
from mixprec.core.convert import model_to_half
from mixprec.core.dtypes import HALF_DTYPES, check_half_dtype
from mixprec.core.master import ParamGroups
from mixprec.core.policy import PrecisionPolicy, Rule, as_policy

__all__ = ["conversion", "to_half_keeping_exact"]


def conversion(
    model_params: ParamGroups,
    model: nn.Module | None,
    dtype: torch.dtype | None,
    keep_fp32: tuple[Rule, ...] | PrecisionPolicy | None,
) -> tuple[torch.dtype, PrecisionPolicy | None]:
    """(dtype, policy) for a wrapper over an optimizer holding `model_params`: the half dtype
    the model trains in and the policy to convert the fp32 `model` with, or None for a model
    already half. Raises before anything is converted."""
    dtypes = {p.dtype for group in model_params for p in group}
    if dtypes & set(HALF_DTYPES):
        if dtype is not None or keep_fp32 is not None:
            raise ValueError(
                "dtype= and keep_fp32= say how to convert the fp32 model, but the optimizer "
                f"already holds half parameters ({sorted(str(d) for d in dtypes)}). Drop "
                "them, or build the optimizer on the fp32 model and pass model=model."
            )
        return next(d for d in HALF_DTYPES if d in dtypes), None
    held = f"the optimizer holds no fp16/bf16 parameters (dtypes: {sorted(map(str, dtypes))})"
    if model is None:
        raise ValueError(
            f"{held}. Pass the fp32 model to convert it with masters from its exact "
            "weights: MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "
            "model=model, dtype=torch.bfloat16)."
        )
    if any(p.dtype in HALF_DTYPES for p in model.parameters()):
        raise ValueError(
            f"{held} but the model is already converted to half: build the optimizer on "
            "its parameters, torch.optim.AdamW(model.parameters()), or on the fp32 model "
            "before converting it (then MixedPrecisionOptimizer converts it, model=model)."
        )
    half = check_half_dtype(torch.float16 if dtype is None else dtype)
    policy = as_policy(keep_fp32)
    policy.fp32_roots(model, half)  # a bad rule raises here, not half-way through
    check_optimizer_holds(model, [p for g in model_params for p in g], every_trainable=False)
    return half, policy


def to_half_keeping_exact(
    model: nn.Module, dtype: torch.dtype, keep_fp32: tuple[Rule, ...] | PrecisionPolicy | None
) -> dict[int, torch.Tensor]:
    """Convert `model` in place as `model_to_half(model, dtype, keep_fp32)` does and return
    the fp32 value each fp32 parameter had before (by id), for masters built after the
    conversion (`MixedPrecisionOptimizer.load_master_values_`): a framework that converts the
    model before building its optimizer (Lightning, the Learner) keeps the exact weights.

    No copies: the conversion gives each converted parameter new `.data`, and these
    references keep the old fp32 storage; a parameter kept fp32 is its own exact value."""
    exact = {id(p): p.detach() for p in model.parameters() if p.dtype == torch.float32}
    model_to_half(model, dtype, as_policy(keep_fp32))
    return exact
