"""Test helper: every tensor in a nested state dict, in a fixed order."""

from collections.abc import Iterator

import torch


def tensors_in(obj) -> Iterator[torch.Tensor]:
    """Yield the tensors of nested dicts (keys sorted), lists and tuples, depth first."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors_in(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
