"""A dispatch mode that records the aten ops run and the tensors they allocate."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OpRecorder(TorchDispatchMode):
    """Records op names and, for each op output not sharing storage with an input, its size."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.allocations: list[tuple[str, int]] = []  # (op, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.allocations.append((name, t.untyped_storage().nbytes()))
        return out

    def count(self, name: str) -> int:
        """How many times the op `name` (e.g. "_foreach_copy_") ran."""
        return self.ops.count(name)

    @property
    def host_syncs(self) -> int:
        """Device-to-host reads (`.item()`, `bool(tensor)`): each is a sync on a GPU."""
        return self.count("_local_scalar_dense")
