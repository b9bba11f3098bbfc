"""Metrics for `Learner`: functions `(output, target) -> scalar tensor`, averaged over samples."""

from __future__ import annotations

import torch

__all__ = ["accuracy"]


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose highest-scoring class (last dim of `output`) is `target`."""
    return (output.argmax(dim=-1) == target).float().mean()
