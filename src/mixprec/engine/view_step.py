"""Step an element-wise optimizer through cache-sized views of its large parameters.

torch's CPU optimizers (the single-tensor path) run each element-wise operation over a
whole tensor before the next, allocating a temporary as large as the tensor for some of
them; on a tensor of millions of elements every operation streams it from memory and
every temporary costs page faults. On 1-D pieces of `VIEW_NUMEL` elements a piece stays in
cache between operations and the temporaries are reused. For the optimizers whose update
of an element depends only on that element's own state, `ViewStep` hands the wrapped
optimizer, for the duration of one `step()` call, such pieces of every large contiguous
parameter (flat master or per-tensor one), of its gradient and of its per-element state:
the numbers are bit for bit those of the whole-tensor step, the state keeps its own tensors
(so `state_dict()` and checkpoints do not change) and small parameters step as they are.
Measured in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mixprec.engine.step_hooks import step_hooks_registered

__all__ = ["ELEMENTWISE_TYPES", "VIEW_NUMEL", "ViewStep"]

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


class _Split:
    """One parameter stepped as views: the views (each with its gradient's view)."""

    __slots__ = ("param", "views")

    def __init__(self, param: torch.Tensor, chunk: int) -> None:
        self.param = param
        flat, grad = param.detach().view(-1), param.grad.detach().view(-1)
        self.views = []
        for a in range(0, flat.numel(), chunk):
            v = flat[a : a + chunk]
            v.grad = grad[a : a + chunk]
            self.views.append(v)


class ViewStep:
    """`step()` of an element-wise `optimizer`, its contiguous parameters of more than
    `chunk` elements (with their gradients and per-element state) cut into 1-D views."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunk: int = VIEW_NUMEL) -> None:
        self.optimizer = optimizer
        self.chunk = int(chunk)
        self._key: tuple[int, ...] | None = None
        self._splits: dict[int, _Split] = {}

    @staticmethod
    def supported(optimizer: torch.optim.Optimizer) -> bool:
        """Whether per-view steps give `optimizer`'s step exactly."""
        return type(optimizer) in ELEMENTWISE_TYPES and not any(
            g.get("differentiable", False) for g in optimizer.param_groups
        )

    def _cuttable(self, p: torch.Tensor) -> bool:
        state = self.optimizer.state.get(p)
        return (
            p.numel() > self.chunk
            and p.grad is not None
            and p.is_contiguous()
            and p.grad.is_contiguous()
            and bool(state)  # a first step creates the state whole
            and all(
                x.is_contiguous()
                for x in state.values()
                if torch.is_tensor(x) and _per_element(x, p)
            )
        )

    def _plan(self) -> dict[int, _Split]:
        """The parameters to cut, by id; made again only when one of them or its grad changes."""
        cut = [p for g in self.optimizer.param_groups for p in g["params"] if self._cuttable(p)]
        key = tuple(x for p in cut for x in (id(p), id(p.grad)))
        if key != self._key:
            self._splits = {id(p): _Split(p, self.chunk) for p in cut}
            self._key = key
        return self._splits

    def step(self) -> None:
        """One step of the wrapped optimizer, large parameters view by view."""
        opt = self.optimizer
        if step_hooks_registered(opt):  # hooks must see the parameters themselves
            opt.step()
            return
        splits = self._plan()
        if not splits:
            opt.step()
            return
        saved = [g["params"] for g in opt.param_groups]
        plans: list[tuple[_Split, dict[str, Any], list[dict[str, Any]]]] = []
        try:
            for sp in splits.values():
                own = opt.state[sp.param]
                pieces = {
                    k: _cut(x, [v.numel() for v in sp.views])
                    for k, x in own.items()
                    if torch.is_tensor(x) and _per_element(x, sp.param)
                }
                states = []
                for j, v in enumerate(sp.views):
                    st = {k: pieces[k][j] if k in pieces else _own(x) for k, x in own.items()}
                    opt.state[v] = st
                    states.append(st)
                plans.append((sp, pieces, states))
            for g in opt.param_groups:
                g["params"] = [
                    v
                    for p in g["params"]
                    for v in (splits[id(p)].views if id(p) in splits else (p,))
                ]
            opt.step()
        finally:
            for g, ps in zip(opt.param_groups, saved):
                g["params"] = ps
            for sp in splits.values():
                for v in sp.views:
                    opt.state.pop(v, None)
        for sp, pieces, states in plans:
            _gather(opt.state[sp.param], pieces, states)


def _per_element(x: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether state entry `x` holds one value per element of parameter `p`."""
    return x.shape == p.shape and x.dim() > 0


def _cut(x: torch.Tensor, numels: Sequence[int]) -> list[torch.Tensor]:
    return list(x.view(-1).split(list(numels)))


def _gather(own: dict[str, Any], pieces: dict[str, list[torch.Tensor]], states: list) -> None:
    """Fold the views' states back into the parameter's own: per-element entries the
    optimizer replaced instead of updating in place, and per-tensor ones (the same on every
    view, such as `step`)."""
    for k, parts in pieces.items():
        for part, st in zip(parts, states):
            if st.get(k) is not part:
                part.copy_(st[k])
    for k, x in states[0].items() if states else ():
        if k in pieces:
            continue
        y = own.get(k)
        if torch.is_tensor(y) and torch.is_tensor(x) and y.shape == x.shape:
            y.copy_(x)
        else:
            own[k] = x


def _own(x: Any) -> Any:
    """A copy of a per-tensor state entry, so that each view updates its own."""
    return x.clone() if torch.is_tensor(x) else x
