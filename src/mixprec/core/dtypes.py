"""The half dtypes mixprec trains in, and the check that a dtype argument is one of them."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HALF_DTYPES", "check_half_dtype"]

HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""The dtypes a model can be trained in under mixprec."""


def check_half_dtype(dtype: Any) -> torch.dtype:
    """Return `dtype` if it is a supported half dtype, else raise a TypeError/ValueError."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype, one of {_dtype_names()}; got {dtype!r} "
            f"({type(dtype).__name__}). Pass e.g. dtype=torch.float16."
        )
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be one of {_dtype_names()}; got {dtype}.")
    return dtype


def _dtype_names() -> str:
    return ", ".join(str(d) for d in HALF_DTYPES)
