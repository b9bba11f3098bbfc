"""`MasterSet`: a half model's parameters and their fp32 masters, per tensor, flat or split.

Where each gradient and weight lives, and the copies between the model and the masters,
whatever the layout: `MixedPrecisionOptimizer` runs the loss-scaled step around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from mixprec.core.chunked import Chunk, master_grad_pairs, pair_chunks
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.flat_group import FlatGroup
from mixprec.core.master import (
    ParamGroups,
    load_masters_,
    master_views,
    unchecked_master2model,
    unchecked_model_g2master_g,
)
from mixprec.engine.fused_adam import FusedItem, fused_items
from mixprec.engine.split_master import SplitMasters

__all__ = ["MasterSet"]


class MasterSet:
    """`model_params` and `master_params` per param group and the flat buffers of a `flat`
    layout (lists shared with the optimizer, which appends to them), the low bits of a split
    one, and the parameters' names for reports."""

    def __init__(
        self,
        model_params: ParamGroups,
        master_params: ParamGroups,
        flat: bool,
        flat_groups: Sequence[FlatGroup],
        split: SplitMasters | None,
        names: Mapping[torch.Tensor, str],
    ) -> None:
        self.model_params = model_params
        self.master_params = master_params
        self.flat = flat
        self.flat_groups = flat_groups
        self.split = split
        self.names = names
        self._chunks: tuple[tuple[int, ...], list[Chunk]] | None = None

    # -- values -------------------------------------------------------------------------------
    def values(self) -> dict[int, torch.Tensor]:
        """Per model parameter (by id), its fp32 master: a view of the master shaped like the
        parameter, or for split masters a rebuilt copy."""
        if self.split is not None:
            return {id(p): self.split.master(p) for group in self.model_params for p in group}
        return {
            id(p): v
            for params, masters in zip(self.model_params, self.master_params)
            for p, v in zip(params, master_views(params, masters, self.flat))
        }

    def load_values_(self, values: Mapping[int, torch.Tensor]) -> None:
        """Set the master of each parameter in `values` (by id) to that fp32 value (split: the
        bf16 weight with it, as its high half)."""
        if self.split is None:
            load_masters_(self.model_params, self.master_params, self.flat, values)
            return
        self.split.load_(
            [[values.get(id(p), self.split.master(p)) for p in g] for g in self.model_params]
        )

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the masters live in: the fp32 masters, or for split masters the
        model's parameters and the bf16 ones' low bits."""
        if self.split is None:
            return [m for group in self.master_params for m in group]
        return [*(p for g in self.model_params for p in g), *self.split.low.values()]

    def copy_to_model(self) -> None:
        """Round the fp32 masters into the model's weights."""
        if self.flat:
            dst = [d for fg in self.flat_groups for d in fg.data]
            src = [s for fg in self.flat_groups for s in fg.master_slices()]
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        else:
            unchecked_master2model(self.model_params, self.master_params)

    # -- gradients ----------------------------------------------------------------------------
    def grad_chunks(self) -> list[Chunk]:
        """(master grad, model grad) pairs in cache-sized chunks; cached for flat buffers."""
        dst, src = master_grad_pairs(self.model_params, self.master_params, self.flat_groups)
        if not self.flat:
            return pair_chunks(dst, src)
        key = tuple(map(id, dst + src))
        if self._chunks is None or self._chunks[0] != key:
            self._chunks = (key, pair_chunks(dst, src))
        return self._chunks[1]

    def master_grads(self) -> list[torch.Tensor]:
        """This step's fp32 gradients, in parameter order."""
        if self.split is not None:
            return self.split.acc_grads()
        return [m.grad for group in self.master_params for m in group if m.grad is not None]

    def move_grads_(self, accumulate: bool) -> None:
        """Model grads into the fp32 ones (copied, or with `accumulate` added), then the
        model's zeroed."""
        if self.split is not None:
            self.split.accumulate_()
        elif self.flat:
            dst, src = master_grad_pairs(self.model_params, self.master_params, self.flat_groups)
            with torch.no_grad():
                if dst:
                    (torch._foreach_add_ if accumulate else torch._foreach_copy_)(dst, src)
        else:
            unchecked_model_g2master_g(self.model_params, self.master_params, accumulate=accumulate)
        self.zero_model_grads()

    def release_master_grads(self) -> None:
        """Free the fp32 gradients (a split layout's model gradients are its own: kept)."""
        if self.split is not None:
            self.split.drop_acc()
            return
        self._chunks = None
        for fg in self.flat_groups:
            fg.release_master_grad()
        for group in self.master_params:
            for m in group:
                m.grad = None

    def zero_model_grads(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the model's gradients; flat buffers' views are zeroed and kept."""
        if self.flat:
            for fg in self.flat_groups:
                fg.repair_grads(strict=False)
            torch._foreach_zero_([g for fg in self.flat_groups for g in fg.grads])
            return
        params = [p for group in self.model_params for p in group if p.grad is not None]
        if set_to_none:
            for p in params:
                p.grad = None
        elif params:
            torch._foreach_zero_([p.grad for p in params])

    def fused_items(self, from_master_grads: bool) -> list[list[FusedItem]]:
        """The fused step's blocks, from the model's half gradients or the fp32 ones."""
        if self.split is not None:
            return self.split.items(from_acc=from_master_grads)
        return fused_items(
            self.model_params, self.master_params, self.flat_groups, from_master_grads
        )

    def has_model_grads(self) -> bool:
        """Whether a backward wrote into the model's gradients since `mark_clean()`."""
        if self.flat:
            return any(fg.touched() for fg in self.flat_groups)
        return any(p.grad is not None for group in self.model_params for p in group)

    def mark_clean(self) -> None:
        """The model's gradients hold nothing of a new step (flat buffers: remember them)."""
        for fg in self.flat_groups:
            fg.mark_clean()

    # -- for reports --------------------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, fp32 master, half copy or None) of every parameter, in the optimizer's order."""
        for i, (params, masters) in enumerate(zip(self.model_params, self.master_params)):
            if self.flat:
                flat = masters[0].detach() if masters else None
                views = [] if flat is None else flat.split([p.numel() for p in params])
            else:
                views = [m.detach() for m in masters]
            for j, (p, m) in enumerate(zip(params, views)):
                half = p.detach() if p.dtype in HALF_DTYPES else None
                yield self.names.get(p, f"param_groups[{i}][{j}]"), m, half

    def named_grads(
        self, from_model_grads: bool
    ) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
        """(name, shape, gradient) of every parameter with one, in the optimizer's order."""
        for i, (params, masters) in enumerate(zip(self.model_params, self.master_params)):
            if from_model_grads:
                grads = [p.grad for p in params]
            elif self.split is not None:
                grads = [self.split.acc.get(p) for p in params]
            elif self.flat:
                flat = masters[0].grad if masters else None
                sizes = [p.numel() for p in params]
                grads = [None] * len(params) if flat is None else list(flat.detach().split(sizes))
            else:
                grads = [m.grad for m in masters]
            for j, (p, g) in enumerate(zip(params, grads)):
                if g is not None:
                    yield self.names.get(p, f"param_groups[{i}][{j}]"), tuple(p.shape), g
