"""Weights a half dtype cannot hold: values that would become inf, or round to zero."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "FLUSH_WARN_FRACTION",
    "SUBNORMAL_WARN_FRACTION",
    "advice_rule",
    "range_warnings",
    "smallest_subnormal",
    "warn_out_of_range",
]

FLUSH_WARN_FRACTION = 1e-3
"""Warn when more than this fraction of a tensor's nonzero weights would round to zero.

A continuous weight distribution always puts a few values below the smallest subnormal;
losing a handful is harmless, losing a whole tensor (e.g. a scale set to 1e-9) is not."""


SUBNORMAL_WARN_FRACTION = 0.5
"""Warn when more than this fraction of a tensor's nonzero weights are subnormal in the half
dtype (e.g. layer-scale gammas of 1e-6 in fp16), where they keep fewer significant bits."""


def advice_rule(module_name: str, module: nn.Module, pname: str) -> str:
    """The rule that keeps parameter `pname` (of `module`, named `module_name`) fp32: the module
    if it is a leaf (a Linear, a LayerScale), else the parameter itself (a token or a scale a
    block or the model owns, which it uses elementwise)."""
    if module_name and next(module.children(), None) is None:
        return module_name
    return pname


@torch.no_grad()
def range_warnings(pname: str, rule: str, p: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """Values that turn into inf, nonzero values that round to zero, and tensors mostly made
    of subnormals, in `dtype`; the advice names `rule` (see `advice_rule`)."""
    if not p.is_floating_point() or p.numel() == 0:
        return []
    w = p.detach()
    cast = w.to(dtype)
    where = f"keep {rule!r} in fp32 (PrecisionPolicy().keep({rule!r}))"
    out = []
    finite = w.isfinite()
    if not bool(finite.all()):
        out.append(f"{pname} already holds {int((~finite).sum())} inf/nan value(s).")
    overflow = finite & ~cast.isfinite()
    if bool(overflow.any()):
        big = w[overflow].abs().max().item()
        out.append(
            f"{pname}: {int(overflow.sum())} value(s) beyond the {str(dtype).removeprefix('torch.')} range "
            f"(max |w| = {big:.4g} > {torch.finfo(dtype).max:g}) would become inf; {where} "
            "or train in bfloat16."
        )
    nonzero = w != 0
    flushed = int((nonzero & (cast == 0)).sum())
    if flushed and flushed > FLUSH_WARN_FRACTION * int(nonzero.sum()):
        out.append(
            f"{pname}: {flushed} of {int(nonzero.sum())} nonzero value(s) are too small for "
            f"{str(dtype).removeprefix('torch.')} (smallest subnormal {smallest_subnormal(dtype):.3g}) and would "
            f"flush to zero; {where}."
        )
    subnormal = nonzero & (cast != 0) & (w.abs() < torch.finfo(dtype).smallest_normal)
    count = int(subnormal.sum())
    if count and count > SUBNORMAL_WARN_FRACTION * int(nonzero.sum()):
        err = ((cast[subnormal].float() - w[subnormal]).abs() / w[subnormal].abs()).max().item()
        out.append(
            f"{pname}: {count} of {int(nonzero.sum())} nonzero value(s) are "
            f"{str(dtype).removeprefix('torch.')} subnormals (below "
            f"{torch.finfo(dtype).smallest_normal:.3g}), rounded by up to {100 * err:.2g}%; "
            f"{where}."
        )
    return out


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive value `dtype` holds."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def warn_out_of_range(modules: Iterable[tuple[str, nn.Module]], dtype: torch.dtype) -> None:
    """Warn (RuntimeWarning) about the fp32 weights of `modules` ((name, module) pairs) that
    would become inf in `dtype`, or already are inf/nan; call it before converting them."""
    if dtype != torch.float16:  # bf16 has the range of fp32
        return
    named = [
        (qual := f"{name}.{pname}" if name else pname, advice_rule(name, module, qual), p.detach())
        for name, module in modules
        for pname, p in module.named_parameters(recurse=False)
        if p.dtype == torch.float32 and p.numel() and p.device.type != "meta"
    ]
    if not named:
        return
    with torch.no_grad():
        device = named[0][2].device
        peaks = torch.stack(
            [n.to(device) for n in torch._foreach_norm([w for *_, w in named], math.inf)]
        )
        suspects = (~(peaks <= torch.finfo(dtype).max)).nonzero().flatten().tolist()  # one sync
    found = [
        w for i in suspects for w in range_warnings(named[i][0], named[i][1], named[i][2], dtype)
    ]
    if found:
        warnings.warn(
            "converting to float16 would break the model before training: " + " ".join(found),
            RuntimeWarning,
            stacklevel=3,
        )
