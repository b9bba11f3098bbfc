"""A tiny learner (64 samples, an MLP with a BatchNorm) and state snapshots, shared by the
Learner, callback and checkpoint tests (and the fresh-process resume script)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mixprec import Callback, DataBunch, Learner, MixedPrecisionOptimizer, accuracy
from mixprec.learner.callback import EVENTS


def tiny_data(seed: int = 0, n: int = 64, batch_size: int = 16) -> DataBunch:
    """Four classes from the signs of two of eight features; shuffled by the global RNG."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    valid = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=batch_size)
    return DataBunch(train, valid, device="cpu")


def tiny_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def make_learner(
    path: Any = ".", seed: int = 0, layer_groups: bool = False, **kwargs: Any
) -> Learner:
    """A fresh learner, its model initialised from `seed` (which also seeds the shuffling)."""
    torch.manual_seed(seed)
    model = tiny_model()
    groups = [model[:3], model[3:]] if layer_groups else None
    return Learner(
        tiny_data(),
        model,
        metrics=[accuracy],
        layer_groups=groups,
        path=path,
        progress=False,
        **kwargs,
    )


def snapshot(learn: Learner) -> dict[str, Any]:
    """Deep copies of everything a step can change: model, masters, optimizer and scaler."""
    opt = learn.opt
    state = {"model": {k: v.clone() for k, v in learn.model.state_dict().items()}}
    if isinstance(opt, MixedPrecisionOptimizer):
        state["masters"] = [m.detach().clone() for g in opt.master_params for m in g]
        state["scaler"] = dict(opt.scaler.state_dict())
        inner = opt.optimizer
    else:
        inner = opt
    if inner is not None:
        state["opt"] = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[p].items()}
            for g in inner.param_groups
            for p in g["params"]
            if p in inner.state
        ]
    return state


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested structures of tensors and plain values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Probe(Callback):
    """Records every event it sees, with a copy of the chosen state keys."""

    def __init__(self, order: int = 0, keys: tuple[str, ...] = ()) -> None:
        self.order = order
        self.keys = keys
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, kwargs: dict[str, Any]) -> None:
        self.seen.append((event, {k: kwargs.get(k) for k in self.keys}))

    def events(self) -> list[str]:
        return [e for e, _ in self.seen]


def _make_event(name: str):
    def handler(self: Probe, **kwargs: Any) -> None:
        self._record(name, kwargs)

    handler.__name__ = name
    return handler


for _event in EVENTS:  # the probe overrides every event, so it sees them all
    setattr(Probe, _event, _make_event(_event))


def master_of(learn: Learner, param: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a model parameter (a view into the flat master if flat)."""
    opt = learn.opt
    for params, masters in zip(opt.model_params, opt.master_params):
        for i, p in enumerate(params):
            if p is param:
                if not opt.flat_master:
                    return masters[i].detach()
                offset = sum(q.numel() for q in params[:i])
                return masters[0].detach()[offset : offset + p.numel()].view_as(p)
    raise KeyError("parameter has no master")


def opt_state_of(learn: Learner, param: torch.Tensor) -> dict[str, Any]:
    """A copy of the optimizer state of a parameter's master (its flat master's, if flat)."""
    opt = learn.opt
    for params, masters in zip(opt.model_params, opt.master_params):
        for i, p in enumerate(params):
            if p is param:
                master = masters[0] if opt.flat_master else masters[i]
                state = opt.optimizer.state.get(master, {})
                return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    raise KeyError("parameter has no master")
