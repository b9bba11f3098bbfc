"""Step an optimizer over a flat fp32 master through cache-sized views of it.

torch's CPU optimizers run each element-wise operation over a whole tensor before the
next, so on one flat master of millions of elements every operation streams it from main
memory; on pieces of `VIEW_NUMEL` elements a piece stays in cache between operations
(AdamW on ResNet-18's 11.2M elements, one thread, an ad-hoc timing under load 6 on 2
cores: 283 ms flat, 229 ms in its 62 parameters, 173 to 178 ms in pieces of 2^16 to 2^18;
whole steps in docs/performance.md). For the optimizers whose update is element-wise, the step therefore
hands the wrapped optimizer, for the duration of `step()`, 1-D pieces of the flat master,
its gradient and its per-element state: the numbers are bit for bit those of the flat step, the
state stays flat (so `state_dict()` and checkpoints do not change) and the copies to and
from the model stay one kernel per buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ELEMENTWISE_TYPES", "VIEW_NUMEL", "FlatViewStep"]

VIEW_NUMEL = 1 << 17
"""Elements per view: 512 KiB of fp32, so a view's master, grad and moments fit in L2/L3."""

ELEMENTWISE_TYPES: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)
"""Optimizers whose update of an element depends only on that element's own state (exact
types: a subclass may change `step`); per-view steps are exact for them."""


class FlatViewStep:
    """`step()` of `optimizer` whose non-empty groups hold one flat master each, of
    `numels[i]` elements for the i-th non-empty group, run on 1-D views of `chunk` elements."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, numels: Sequence[int], chunk: int = VIEW_NUMEL
    ) -> None:
        self.optimizer = optimizer
        self.numels = [int(n) for n in numels]
        self.shapes = [
            [torch.Size([min(chunk, n - a)]) for a in range(0, n, chunk)] for n in self.numels
        ]
        self._key: tuple[int, ...] | None = None
        self._views: list[list[torch.Tensor]] = []

    @staticmethod
    def supported(optimizer: torch.optim.Optimizer) -> bool:
        """Whether per-view steps give `optimizer`'s flat step exactly."""
        return type(optimizer) in ELEMENTWISE_TYPES and not any(
            g.get("differentiable", False) for g in optimizer.param_groups
        )

    def _split(self, flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in shapes:
            n = shape.numel()
            out.append(flat[offset : offset + n].view(shape))
            offset += n
        return out

    def step(self) -> None:
        """One step of the wrapped optimizer, view by view; the flat state is kept."""
        opt = self.optimizer
        groups = [(g, g["params"][0]) for g in opt.param_groups if g["params"]]
        masters = [m for _, m in groups]
        if (
            any(len(g["params"]) != 1 for g, _ in groups)
            or [m.numel() for m in masters] != self.numels
            or any(m.grad is None or not opt.state.get(m) for m in masters)
        ):
            opt.step()  # first step (no state to view yet), or a layout this does not know
            return
        views = self._views_of(masters)
        saved = [g["params"] for g, _ in groups]
        # per group: (flat state, its per-element entries as views, each view's state)
        plans: list[tuple[dict[str, Any], dict[str, list[torch.Tensor]], list[dict]]] = []
        try:
            for (g, m), vs in zip(groups, views):
                flat_state = opt.state[m]
                shapes = [v.shape for v in vs]
                sliced = {
                    k: self._split(x, shapes)
                    for k, x in flat_state.items()
                    if k != "step"
                    and torch.is_tensor(x)
                    and x.dim() == 1
                    and x.numel() == m.numel()
                }
                states = []
                for j, v in enumerate(vs):
                    st = {
                        k: sliced[k][j] if k in sliced else _own(x) for k, x in flat_state.items()
                    }
                    opt.state[v] = st
                    states.append(st)
                plans.append((flat_state, sliced, states))
                g["params"] = vs
            opt.step()
        finally:
            for (g, _), ps in zip(groups, saved):
                g["params"] = ps
            for vs in views:
                for v in vs:
                    opt.state.pop(v, None)
        for flat_state, sliced, states in plans:
            for k, pieces in sliced.items():  # an entry replaced, not updated in place
                for piece, st in zip(pieces, states):
                    if st.get(k) is not piece:
                        piece.copy_(st[k])
            for k, x in states[0].items() if states else ():  # per-tensor: same on every view
                if k in sliced:
                    continue
                y = flat_state.get(k)
                if torch.is_tensor(y) and torch.is_tensor(x) and y.shape == x.shape:
                    y.copy_(x)
                else:
                    flat_state[k] = x

    def _views_of(self, masters: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per group, the views of the master, each with the matching view of the master's
        gradient as `.grad`; made again only when a master or gradient changes."""
        key = tuple(x for m in masters for x in (id(m), id(m.grad)))
        if key != self._key:
            self._views = []
            for m, shapes in zip(masters, self.shapes):
                vs = self._split(m.detach(), shapes)
                for v, gv in zip(vs, self._split(m.grad.detach(), shapes)):
                    v.grad = gv
                self._views.append(vs)
            self._key = key
        return self._views


def _own(x: Any) -> Any:
    """A copy of a per-tensor state entry, so that each view updates its own."""
    return x.clone() if torch.is_tensor(x) else x
