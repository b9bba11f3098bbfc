"""Split fp32 masters for `MixedPrecisionOptimizer(master="split")`: 14 bytes a parameter.

Each bf16 parameter keeps its fp32 master as itself (the high half, RNE of the master) plus
16 low bits (`mixprec.core.split`); fp32 parameters (norm layers) are their own masters.
The wrapped Adam/AdamW holds the model's parameters, with fp32 moments; a step rebuilds
each master in a cache-sized scratch, runs torch's fused kernel on it and stores it back
(`mixprec.engine.fused_adam`). AdamW's training state is then 14 bytes per bf16 parameter:
weight 2, low bits 2, moments 8, gradient 2. Between `backward` calls that accumulate, and
after an explicit `unscale_()`, the gradients live in fp32 (4 bytes more while they do),
exactly as on the fp32-master path, so the numbers are that path's bit for bit except for
the rare master stored one ulp off (counted in `ties`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixprec.core.master import ParamGroups
from mixprec.core.split import join, split_
from mixprec.engine.fused_adam import fused_unsupported_reason
from mixprec.engine.fused_items import FusedItem

__all__ = ["SplitMasters", "check_split_options"]


def check_split_options(
    optimizer: torch.optim.Optimizer, params: ParamGroups, flat_master: bool, fused: bool | None
) -> None:
    """Raise ValueError unless split masters can serve this optimizer and these parameters."""
    call = 'MixedPrecisionOptimizer(..., master="split"'
    if flat_master:
        raise ValueError(f"{call}, flat_master=True): split masters are per tensor; drop one.")
    if fused is False:
        raise ValueError(
            f"{call}, fused=False): split masters are rebuilt inside the fused Adam(W) step; "
            "drop fused=False or use master='fp32'."
        )
    reason = fused_unsupported_reason(optimizer)
    if reason is not None:
        raise ValueError(f'{call}): {reason}. Use master="fp32".')
    odd = sorted({str(p.dtype) for g in params for p in g} - {"torch.bfloat16", "torch.float32"})
    if odd:
        raise ValueError(
            f"{call}) stores masters as bf16 weights plus 16 low bits; the optimizer holds "
            f"{', '.join(odd)} parameters. Convert the model with model_to_half(model, "
            'torch.bfloat16) or use master="fp32".'
        )


class SplitMasters:
    """The low bits of every bf16 parameter, and fp32 gradients while accumulating."""

    def __init__(self, params: ParamGroups) -> None:
        self.params = params
        self.low: dict[torch.Tensor, torch.Tensor] = {}
        for g in params:
            self.add_group(g)
        self.acc: dict[torch.Tensor, torch.Tensor] = {}  # fp32 grads of this step, if any
        # one detached view per parameter, kept: the fused step keeps its plan while they stay
        self._detached: dict[torch.Tensor, torch.Tensor] = {}

    def add_group(self, params: Sequence[torch.Tensor]) -> None:
        """Low bits (zero: the master is the bf16 value) for a new group's parameters."""
        for p in params:
            if p.dtype == torch.bfloat16:
                self.low[p] = torch.zeros_like(
                    p, dtype=torch.int16, memory_format=torch.preserve_format
                )

    def remove(self, params: Sequence[torch.Tensor]) -> None:
        """Forget the low bits and fp32 gradients of `params` (no longer stepped)."""
        for p in params:
            self.low.pop(p, None)
            self.acc.pop(p, None)
            self._detached.pop(p, None)

    # -- values -------------------------------------------------------------------------------
    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of parameter `p` (a new tensor for bf16 `p`, `p` itself if fp32)."""
        low = self.low.get(p)
        return p.detach() if low is None else join(p.detach(), low)

    def masters(self) -> list[list[torch.Tensor]]:
        """Every fp32 master, per group (new tensors for the bf16 parameters)."""
        return [[self.master(p) for p in g] for g in self.params]

    def load_(self, masters: Sequence[Sequence[torch.Tensor]]) -> None:
        """Set every master from fp32 values: weights and low bits (bf16), values (fp32)."""
        with torch.no_grad():
            for g, mg in zip(self.params, masters):
                for p, m in zip(g, mg):
                    m = m.detach().to(p.device, torch.float32)
                    low = self.low.get(p)
                    if low is None:
                        p.copy_(m)
                    else:
                        split_(m.reshape(p.shape).contiguous(), p.data, low)

    # -- gradients ----------------------------------------------------------------------------
    def accumulate_(self) -> None:
        """Add the model's gradients to the fp32 ones of this step (copy on the first
        micro-batch), then zero the model's."""
        dst_new, src_new, dst, src = [], [], [], []
        for g in self.params:
            for p in g:
                if p.grad is None:
                    continue
                a = self.acc.get(p)
                if a is None:
                    self.acc[p] = a = torch.empty_like(p, dtype=torch.float32)
                    dst_new.append(a)
                    src_new.append(p.grad)
                else:
                    dst.append(a)
                    src.append(p.grad)
        with torch.no_grad():
            if dst_new:
                torch._foreach_copy_(dst_new, src_new)
            if dst:
                torch._foreach_add_(dst, src)
            for g in self.params:
                for p in g:
                    p.grad = None

    def acc_grads(self) -> list[torch.Tensor]:
        """This step's fp32 gradients, in parameter order."""
        return [self.acc[p] for g in self.params for p in g if p in self.acc]

    def clip_proxies(self) -> list[torch.Tensor]:
        """Tensors whose `.grad` is this step's fp32 gradient, in parameter order, for
        clipping functions that take parameters."""
        proxies = []
        for g in self.params:
            for p in g:
                a = self.acc.get(p)
                if a is not None:
                    proxy = a.detach()
                    proxy.grad = a
                    proxies.append(proxy)
        return proxies

    def drop_acc(self) -> None:
        """Free the fp32 gradients: none are kept between steps."""
        self.acc = {}

    def items(self, from_acc: bool) -> list[list[FusedItem]]:
        """Per group, the fused step's blocks: from the model's half gradients, or (with
        `from_acc`) from this step's fp32 gradients."""
        out = []
        for g in self.params:
            items = []
            for p in g:
                grad = self.acc.get(p) if from_acc else p.grad
                if grad is not None:
                    v = self._detached_view(p)  # fp32: stepped in place; bf16: rebuilt, stored
                    items.append(FusedItem(p, v, None, grad, v, self.low.get(p)))
            out.append(items)
        return out

    def _detached_view(self, p: torch.Tensor) -> torch.Tensor:
        """`p.detach()`, the same object from step to step while `p`'s data stays put."""
        v = self._detached.get(p)
        if v is None or v.data_ptr() != p.data_ptr() or v.shape != p.shape or v.dtype != p.dtype:
            v = self._detached[p] = p.detach()
        return v
