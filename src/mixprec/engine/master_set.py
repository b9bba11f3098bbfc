"""`MasterSet`: a half model's parameters and their fp32 masters, per tensor, flat or split.

Where each gradient and weight lives, and the copies between the model and the masters,
whatever the layout: `MixedPrecisionOptimizer` runs the loss-scaled step around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableSequence, Sequence
from typing import Any

import torch
from torch import nn

from mixprec.core.chunked import Chunk, master_grad_pairs, pair_chunks
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.flat_group import FlatGroup
from mixprec.core.master import (
    ParamGroups,
    flatten_like,
    load_masters_,
    make_masters,
    master_views,
    unchecked_master2model,
    unchecked_model_g2master_g,
)
from mixprec.core.master_state import move_state_to_masters
from mixprec.engine.fused_items import FusedItem, fused_items
from mixprec.engine.split_master import SplitMasters

__all__ = ["MasterSet"]


class MasterSet:
    """`model_params` and `master_params` per param group (each `master_params[i]` is the
    wrapped optimizer's group `params` list itself), the frozen parameters of each group (no
    master), the flat buffers of a `flat` layout, the low bits of a split one, and the
    parameters' names for reports."""

    def __init__(
        self,
        model_params: ParamGroups,
        master_params: ParamGroups,
        flat: bool,
        flat_groups: MutableSequence[FlatGroup],
        split: SplitMasters | None,
        names: Mapping[torch.Tensor, str],
        frozen: ParamGroups,
    ) -> None:
        self.model_params = model_params
        self.master_params = master_params
        self.frozen = frozen
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

    # -- parameters joining and leaving ------------------------------------------------------
    def add_group(self, params: Sequence[torch.Tensor], group: dict[str, Any]) -> None:
        """A new param group `group` (of the wrapped optimizer) for the model parameters
        `params`: masters for the trainable ones, which become `group["params"]`."""
        trainable = [p for p in params if p.requires_grad]
        if self.split is not None:
            self.split.add_group(trainable)
            masters = list(trainable)
        else:
            (masters,) = make_masters([trainable], self.flat)
        if self.flat and trainable:
            self.flat_groups.append(FlatGroup(trainable, masters[0]))
        group["params"] = masters
        self.model_params.append(trainable)
        self.master_params.append(masters)
        self.frozen.append([p for p in params if not p.requires_grad])

    def unfrozen(self) -> list[torch.Tensor]:
        """The frozen parameters that have been unfrozen since, checked: a flat group that
        had masters cannot take more (ValueError, naming the fix)."""
        taken = [p for g in self.frozen for p in g if p.requires_grad]  # every step: usually []
        if not taken:
            return taken
        for i, (frozen, params) in enumerate(zip(self.frozen, self.model_params)):
            n = sum(p.requires_grad for p in frozen)
            if self.flat and params and n:
                raise ValueError(
                    f"flat_master=True lays out param group {i} once; {n} of its frozen "
                    "parameters were unfrozen after the optimizer was built. Unfreeze whole "
                    "groups before building the wrapper, or use flat_master=False."
                )
        return taken

    def take_unfrozen_(self, state: dict) -> None:
        """Masters for the unfrozen parameters (`unfrozen()`, checked first), from their
        current values, in the group they were in; their optimizer `state` moves onto them."""
        for i, frozen in enumerate(self.frozen):
            unfrozen = [p for p in frozen if p.requires_grad]
            if not unfrozen:
                continue
            self.frozen[i] = [p for p in frozen if not p.requires_grad]
            if self.split is not None:
                self.split.add_group(unfrozen)
                masters = list(unfrozen)
            else:
                (masters,) = make_masters([unfrozen], self.flat)
                move_state_to_masters(state, [unfrozen], [masters], self.flat)
            self.model_params[i].extend(unfrozen)
            self.master_params[i].extend(masters)
            if self.flat:  # the group had none: its flat buffers, in group order
                by_master = {id(fg.master): fg for fg in self.flat_groups}
                self.flat_groups[:] = [
                    by_master.get(id(ms[0])) or FlatGroup(ps, ms[0])
                    for ps, ms in zip(self.model_params, self.master_params)
                    if ps
                ]

    @torch.no_grad()
    def remove_(self, params: Sequence[torch.Tensor], state: dict) -> None:
        """`params` (held, checked by the caller) leave their groups with their masters and
        optimizer `state`; flat groups keep the others' values and per-element state. The new
        flat masters are made before anything changes."""
        drop = {id(p) for p in params}
        changes = []  # (group, kept params, their masters, a new flat master's state)
        for i, (ps, ms) in enumerate(zip(self.model_params, self.master_params)):
            if not any(id(p) in drop for p in ps):
                continue
            keep = [j for j, p in enumerate(ps) if id(p) not in drop]
            kept = [ps[j] for j in keep]
            if not self.flat or not kept:
                changes.append((i, kept, [] if self.flat else [ms[j] for j in keep], None))
                continue
            old = ms[0]
            master = nn.Parameter(
                flatten_like([master_views(ps, ms, True)[j] for j in keep], kept, old.device)
            )
            master.grad = torch.zeros_like(master)  # as make_masters leaves it
            cut = {  # per-element entries cut to the kept parameters, per-tensor ones kept
                k: flatten_like([master_views(ps, [v], True)[j] for j in keep], kept, v.device)
                if torch.is_tensor(v) and v.shape == old.shape
                else v
                for k, v in state.get(old, {}).items()
            }
            changes.append((i, kept, [master], cut))
        for i, kept, masters, cut in changes:
            ps, ms = self.model_params[i], self.master_params[i]
            if self.flat:
                at = next(k for k, fg in enumerate(self.flat_groups) if fg.master is ms[0])
                del self.flat_groups[at]
                if kept:
                    self.flat_groups.insert(at, FlatGroup(kept, masters[0]))
                    if cut:
                        state[masters[0]] = cut
                for p in ps:  # removed ones: out of the flat buffers, on their own storage
                    if id(p) in drop:
                        p.data, p.grad = p.data.clone(), None
            if self.split is not None:  # its masters are the parameters themselves
                self.split.remove([p for p in ps if id(p) in drop])
            kept_masters = set(map(id, masters))
            for m in ms:
                if id(m) not in kept_masters:
                    state.pop(m, None)
            self.model_params[i] = kept
            ms[:] = masters  # the optimizer's group list, changed in place
        for i, frozen in enumerate(self.frozen):  # frozen ones have no master
            self.frozen[i] = [p for p in frozen if id(p) not in drop]

    def reseat_(self) -> None:
        """Flat layouts: parameters given new storage of the same dtype, shape and device
        (`model.float()`, then converted back) go back into the buffers, holding the masters'
        rounding again; per tensor and split, nothing to do."""
        if not self.flat:
            return
        for fg in self.flat_groups:
            fg.reseat_()
        self.copy_to_model()
        self.mark_clean()

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
