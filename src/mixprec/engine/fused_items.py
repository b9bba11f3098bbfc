"""The blocks a fused Adam(W) step updates: each master (or flat buffer slice of one), its
gradient and the half tensor its new values are rounded into."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mixprec.core.flat_group import FlatGroup
from mixprec.core.master import ParamGroups

__all__ = ["FusedItem", "fused_items"]


class FusedItem(NamedTuple):
    """One block to update: `view` of `master` at element `offset` (None: the whole master),
    from the half gradient `grad`, rounding the result into the half tensor `half`.

    With `low` (split masters, `mixprec.core.split`), `master` is the bf16 model parameter
    itself (the optimizer's state key) and the fp32 master is rebuilt from `half` and `low`
    in a scratch buffer for the update, then stored back into both."""

    master: torch.Tensor
    view: torch.Tensor
    offset: int | None
    grad: torch.Tensor
    half: torch.Tensor
    low: torch.Tensor | None = None


def fused_items(
    model_params: ParamGroups,
    master_params: ParamGroups,
    flat_groups: Sequence[FlatGroup],
    from_master_grads: bool = False,
) -> list[list[FusedItem]]:
    """Per param group, the blocks a fused step updates: every flat buffer's slice of the
    group's master (`flat_groups` given, one per non-empty group), or every master whose
    parameter has a gradient. `from_master_grads`: the gradients are the (already unscaled)
    fp32 master gradients, not the model's half ones; a master without one is left out."""
    if not flat_groups:
        return [
            [
                FusedItem(m, m.detach(), None, g, p)
                for p, m in zip(ps, ms)
                for g in ((m.grad if from_master_grads else p.grad),)
                if g is not None
            ]
            for ps, ms in zip(model_params, master_params)
        ]
    flat = iter(flat_groups)
    items: list[list[FusedItem]] = []
    for params, masters in zip(model_params, master_params):
        fg = next(flat) if params else None
        if fg is None or (from_master_grads and masters[0].grad is None):
            items.append([])
            continue
        if from_master_grads:
            grads = fg.master_grad_slices()
        else:
            fg.repair_grads()
            grads = fg.grads
        md = masters[0].detach()
        items.append(
            [
                FusedItem(masters[0], md[a:b], a, g, d)
                for (a, b), g, d in zip(fg.slices, grads, fg.data)
            ]
        )
    return items
