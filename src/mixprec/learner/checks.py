"""Checks of what the Learner is given: batches and metrics, refused before training starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_batch", "check_metrics", "holds_tensor"]


def holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(holds_tensor(v) for v in obj)
    return False


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    kind = f"{type(obj).__module__}.{type(obj).__name__}".removeprefix("builtins.")
    return f"{kind} of length {len(obj)}" if isinstance(obj, (list, tuple, Mapping, str)) else kind


def check_batch(batch: Any, index: int) -> None:
    """Raise a TypeError unless `batch` is an (input, target) pair each holding a tensor
    (alone or in a tuple, list or dict)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {index} must be an (input, target) pair; got {_describe(batch)}. A "
            "DataLoader over TensorDataset(x, y) yields such pairs."
        )
    for what, part in zip(("input", "target"), batch):
        if not holds_tensor(part):
            raise TypeError(
                f"batch {index}: the {what} holds no tensor; got {_describe(part)}. Convert "
                "it with torch.as_tensor (torch.from_numpy for arrays), or let the "
                "DataLoader's default collate_fn do it."
            )


def check_metrics(metrics: Any) -> list[Any]:
    """`metrics` as a list (one callable alone is a list of one, as in fastai v1); raise a
    TypeError if one of them is not callable."""
    metrics = [metrics] if callable(metrics) or isinstance(metrics, str) else list(metrics)
    wrong = [m for m in metrics if not callable(m)]
    if wrong:
        raise TypeError(
            f"metrics must be callables metric(output, target); got {wrong[0]!r} "
            f"({type(wrong[0]).__name__}). Pass the function itself, e.g. metrics=[accuracy]."
        )
    return metrics
