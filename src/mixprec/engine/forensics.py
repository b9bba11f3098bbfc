"""Overflow forensics: which parameters had inf/nan gradients when a step was skipped.

Nothing here runs on a clean step. `MixedPrecisionOptimizer` builds an `OverflowReport`
only after its one host sync per step has said that the step overflowed, from the
gradients it still holds at that point (the unscaled fp32 master gradients, or the half
gradients on the fused path), and keeps it as `opt.last_overflow`::

    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), model=model)
    ...
    if not opt.step():
        print(opt.last_overflow)   # step 3 (counted from 0; loss scale 4.0): inf/nan
                                   # gradients in 1 parameter(s): encoder.0.weight (3 inf of 4096)

Names come from `model.named_parameters()` (`model=` given to the optimizer; the
`MixedPrecision` callback passes the learner's model); without them a parameter is named
by its place in the optimizer, e.g. "param_groups[0][3]".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mixprec.core.checks import check_optimizer_holds
from mixprec.parallel.distributed import unwrap

__all__ = [
    "GradFault",
    "OverflowReport",
    "WeightFault",
    "weight_faults",
    "clip_grad_norm_if_finite_",
    "clip_to_norm_",
    "total_grad_norm",
    "naming_overflow",
    "overflow_report",
    "param_names",
]

SHOWN = 8  # parameters named in a message; the report itself holds them all


class GradFault(NamedTuple):
    """One parameter whose gradient held inf/nan: its name, shape and how many of each."""

    name: str
    shape: tuple[int, ...]
    nan: int
    inf: int

    def __str__(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.nan, "nan"), (self.inf, "inf")) if n]
        return f"{self.name} ({', '.join(parts)} of {math.prod(self.shape)})"


class WeightFault(NamedTuple):
    """A parameter whose weight itself is not finite: nan/inf in its fp32 value (`nan`,
    `inf`), or (`half_inf`) inf only in its half copy, because the fp32 master grew past
    what the half dtype holds (`max_abs`)."""

    name: str
    nan: int
    inf: int
    half_inf: int
    max_abs: float

    def __str__(self) -> str:
        if self.nan or self.inf:
            parts = [f"{n} {what}" for n, what in ((self.nan, "nan"), (self.inf, "inf")) if n]
            return f"{self.name} (the weight itself holds {', '.join(parts)})"
        return (
            f"{self.name} (its fp32 master reaches |w| = {self.max_abs:.4g}, beyond the half "
            f"range: {self.half_inf} value(s) are inf in the half model)"
        )


@dataclass(frozen=True)
class OverflowReport:
    """What a skipped step's gradients held: `step` is its index (0 for the first step the
    optimizer took: a Learner's `iteration`), `loss_scale` the scale its loss was multiplied
    by, `faults` every parameter with an inf/nan gradient, in the optimizer's order, and
    `weights` the parameters whose weights themselves are not finite (then the gradients
    are not the cause: the weights are)."""

    step: int
    loss_scale: float
    faults: tuple[GradFault, ...]
    weights: tuple[WeightFault, ...] = ()
    norm_overflow: bool = False  # every gradient finite, their global norm not (clip=)

    @property
    def names(self) -> list[str]:
        """The names of the parameters whose gradients held inf/nan."""
        return [f.name for f in self.faults]

    def __str__(self) -> str:
        head = f"step {self.step} (counted from 0; loss scale {self.loss_scale})"
        if not self.faults and self.norm_overflow:
            return (
                f"{head}: every gradient is finite, but their global norm overflows fp32, so "
                "clip= cannot scale them and the step is skipped. Lower the loss scale, or "
                "find the layer whose gradients grow that large (opt.last_grad_norm is inf)"
            )
        if not self.faults:
            return (
                f"{head}: no inf/nan in this process's gradients; another rank's gradients "
                "overflowed (every rank skips together)"
            )
        shown = ", ".join(map(str, self.faults[:SHOWN]))
        more = f" and {len(self.faults) - SHOWN} more" if len(self.faults) > SHOWN else ""
        text = f"{head}: inf/nan gradients in {len(self.faults)} parameter(s): {shown}{more}"
        if self.weights:
            named = ", ".join(map(str, self.weights[:SHOWN]))
            text += f"; not finite WEIGHTS, the cause: {named}"
        return text


def param_names(
    model: nn.Module, held: Iterable[Iterable[torch.Tensor]] = ()
) -> dict[torch.Tensor, str]:
    """Each parameter of `model` (inside DDP, if wrapped) to its qualified name; raise a
    ValueError if the optimizer's parameters `held` (per param group) are not all `model`'s."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module whose parameters the optimizer holds; got "
            f"{type(model).__name__}."
        )
    model = unwrap(model)
    check_optimizer_holds(model, (p for group in held for p in group), every_trainable=False)
    return {p: name for name, p in model.named_parameters()}


@torch.no_grad()
def overflow_report(
    named_grads: Iterable[tuple[str, tuple[int, ...], torch.Tensor]], step: int, scale: float
) -> OverflowReport:
    """The report of skipped step `step` at loss scale `scale`, from the (name, shape, grad)
    of every parameter with a gradient. Call it only once the step is known to have
    overflowed: it costs a pass over the gradients and a host sync."""
    named = [(n, shape, g) for n, shape, g in named_grads if not g.is_sparse]
    faults: tuple[GradFault, ...] = ()
    if named:
        device = named[0][2].device
        counts = torch.stack(
            [torch.stack((g.isnan().sum(), g.isinf().sum())).to(device) for _, _, g in named]
        ).tolist()
        faults = tuple(
            GradFault(name, shape, nan, inf)
            for (name, shape, _), (nan, inf) in zip(named, counts)
            if nan or inf
        )
    return OverflowReport(step, scale, faults)


@torch.no_grad()
def weight_faults(
    named_weights: Iterable[tuple[str, torch.Tensor, torch.Tensor | None]], warn: bool = True
) -> tuple[WeightFault, ...]:
    """The parameters whose weights are not finite, from (name, fp32 weight or master, half
    copy or None) of each; one host sync. Warns (RuntimeWarning) naming them, unless not
    `warn`. Call it only on a skipped step or a load: it costs a pass over the weights."""
    named = list(named_weights)
    if not named:
        return ()
    device = named[0][1].device
    rows = []
    for _, w, half in named:
        w = w.detach()
        finite = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        half_inf = half.isinf().sum() if half is not None else torch.zeros((), device=w.device)
        row = (w.isnan().sum(), w.isinf().sum(), half_inf.to(w.device), finite.abs().amax())
        rows.append(torch.stack([x.float() for x in row]).to(device))
    values = torch.stack(rows).tolist()
    found = tuple(
        WeightFault(name, int(nan), int(inf), int(half_inf) if not (nan or inf) else 0, top)
        for (name, _, _), (nan, inf, half_inf, top) in zip(named, values)
        if nan or inf or half_inf
    )
    if found and warn:
        warnings.warn(
            "the weights themselves are not finite, so the gradients overflow because of "
            f"them: {', '.join(map(str, found[:SHOWN]))}. Lower the learning rate, clip, add "
            "weight decay, or keep these layers in fp32 (or train in bfloat16).",
            RuntimeWarning,
            stacklevel=3,
        )
    return found


@contextmanager
def naming_overflow(report: OverflowReport | None) -> Iterator[None]:
    """Within: a FloatingPointError (the scaler's persistent-overflow error) is raised again
    with `report`'s parameter names added to its message."""
    try:
        yield
    except FloatingPointError as error:
        if report is None:
            raise
        raise FloatingPointError(f"{error} The last skipped step, {report}.") from None


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients (foreach, fp32; 0 without any), as
    `torch.nn.utils.clip_grad_norm_` computes it. No host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(grads, foreach=True)
    if not grads:  # torch < 2.6
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@torch.no_grad()
def clip_to_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients whose global norm is `norm` down to `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does; an inf/nan `norm` leaves them as they are (the
    step is skipped: torch would multiply every gradient by nan or 0, wiping out where the
    inf/nan were). No host sync."""
    params = list(parameters)
    finite_or_zero = torch.nan_to_num(norm, nan=0.0, posinf=0.0, neginf=0.0)  # 0: no clipping
    if hasattr(nn.utils, "clip_grads_with_norm_"):
        nn.utils.clip_grads_with_norm_(params, max_norm, finite_or_zero, foreach=True)
        return
    grads = [p.grad for p in params if p.grad is not None]  # torch < 2.6
    if grads:
        coef = torch.clamp(max_norm / (finite_or_zero + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def clip_grad_norm_if_finite_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (foreach), except that gradients whose total norm is
    inf/nan are left as they are; returns the norm. No host sync."""
    params = list(parameters)
    norm = total_grad_norm(params)
    clip_to_norm_(params, max_norm, norm)
    return norm
