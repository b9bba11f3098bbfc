"""`FlatGroup`: a layer group's model parameters and gradients as views into contiguous
buffers, so each copy between the model and its flat fp32 master is one kernel per buffer
(the layout of a flat buffer: `mixprec.core.master`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixprec.core.master import flat_views

__all__ = ["FlatGroup"]


class FlatGroup:
    """A layer group whose model parameters and gradients are views into contiguous buffers.

    Consecutive parameters of one dtype share a buffer (a half model with fp32 norm layers
    has a few; an all-half group has one), so gradients to master and master to model are
    one copy kernel per buffer, with nothing allocated per step. `master` is the group's
    flat fp32 master, in the order of `params`.
    """

    def __init__(self, params: Sequence[nn.Parameter], master: nn.Parameter) -> None:
        self.params = list(params)
        self.master = master
        self.data: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self._slices: list[tuple[int, int]] = []
        self._grad_views: list[torch.Tensor] = []
        self._data_views: list[torch.Tensor] = []
        self._buffer_of: list[int] = []  # each parameter's buffer in `data` and `grads`
        self._data_ptrs: list[int] = []  # where each parameter's view starts: to notice a move
        start = 0
        while start < len(self.params):
            end = start
            while end < len(self.params) and self.params[end].dtype == self.params[start].dtype:
                end += 1
            self._add_buffer(self.params[start:end])
            start = end
        self._master_grad: torch.Tensor | None = None
        self._master_grad_slices: list[torch.Tensor] = []
        self._clean: list[int] = []  # the gradient buffers' versions when last cleaned

    def _add_buffer(self, run: Sequence[nn.Parameter]) -> None:
        offset = sum(d.numel() for d in self.data)
        n = sum(p.numel() for p in run)
        data = torch.empty(n, dtype=run[0].dtype, device=run[0].device)
        grad = torch.zeros_like(data)
        with torch.no_grad():
            for p, view, grad_view in zip(run, flat_views(data, run), flat_views(grad, run)):
                view.copy_(p)
                if p.grad is not None:
                    grad_view.copy_(p.grad)
                p.data = view
                p.grad = grad_view
                self._grad_views.append(grad_view)
                self._data_views.append(view)
                self._buffer_of.append(len(self.data))
                self._data_ptrs.append(view.data_ptr())
        self.data.append(data)
        self.grads.append(grad)
        self._slices.append((offset, offset + n))

    def repair_grads(self, strict: bool = True) -> None:
        """Re-point any gradient that was replaced or removed (`set_to_none`) at its view.
        Not `strict` (zeroing gradients), a moved parameter just loses its gradient.

        Raises a RuntimeError if a parameter was moved out of the flat buffers (e.g. by
        `model.to(...)` after the optimizer was built): the copies here and into the model
        would no longer reach it, and it would silently stop training."""
        with torch.no_grad():
            for p, view, data_ptr in zip(self.params, self._grad_views, self._data_ptrs):
                if p.data_ptr() != data_ptr and not strict:
                    p.grad = None  # zeroing: the step (strict) says what happened
                    continue
                if p.data_ptr() != data_ptr:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} ({p.dtype}) no longer lives in "
                        "its flat_master buffer: the model was converted or moved (.to(), "
                        ".half(), .float(), memory_format) after the optimizer was built. Do "
                        "that before building MixedPrecisionOptimizer, or use flat_master=False."
                    )
                g = p.grad
                if g is view:
                    continue
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g)
                p.grad = view

    def reseat_(self) -> int:
        """Put back into the buffers the parameters a conversion gave storage of their own
        (`model.float()`, then back to the buffer's dtype: same dtype, shape and device): their
        values are the buffer's again, which hold the masters' rounding, and their gradients
        its views (a conversion also replaces the storage of the gradient views it finds).
        Returns how many were put back; raises the `repair_grads` error, changing nothing,
        for a parameter that now has another dtype, shape or device."""
        moved = [
            i for i, (p, ptr) in enumerate(zip(self.params, self._data_ptrs)) if p.data_ptr() != ptr
        ]
        if any(
            (self.params[i].dtype, self.params[i].shape, self.params[i].device)
            != (self._data_views[i].dtype, self._data_views[i].shape, self._data_views[i].device)
            for i in moved
        ):
            self.repair_grads()  # raises, naming the parameter
        with torch.no_grad():
            for i in moved:
                view = self._data_views[i]
                grads = self.grads[self._buffer_of[i]]
                grad = grads.as_strided(view.shape, view.stride(), view.storage_offset())
                self._grad_views[i] = grad
                p = self.params[i]
                p.grad = None
                p.data = view
                p.grad = grad
        return len(moved)

    def mark_clean(self) -> None:
        """Remember the gradient buffers as they are now (zeroed between steps)."""
        self._clean = [g._version for g in self.grads]

    def touched(self) -> bool:
        """Whether a backward wrote a gradient since `mark_clean()`: into the buffers (their
        version counters moved) or in place of them (`set_to_none` between)."""
        if [g._version for g in self.grads] != self._clean:
            return True
        return any(
            p.grad is not None and p.grad is not v for p, v in zip(self.params, self._grad_views)
        )

    def master_grad_slices(self) -> list[torch.Tensor]:
        """Views of the master's gradient matching `grads`, made once per gradient tensor."""
        if self.master.grad is None:
            self.master.grad = torch.zeros_like(self.master)
        if self._master_grad is not self.master.grad:
            self._master_grad = self.master.grad
            self._master_grad_slices = [self.master.grad[a:b] for a, b in self._slices]
        return self._master_grad_slices

    @property
    def slices(self) -> list[tuple[int, int]]:
        """`(start, end)` in the master of each buffer of `data` and `grads`."""
        return list(self._slices)

    def release_master_grad(self) -> None:
        """Drop the master's gradient (and the views of it kept here) to free its memory."""
        self.master.grad = None
        self._master_grad = None
        self._master_grad_slices = []

    def master_slices(self) -> list[torch.Tensor]:
        """Views of the master's values matching `data`."""
        master = self.master.detach()
        return [master[a:b] for a, b in self._slices]
