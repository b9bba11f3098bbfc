"""Metrics for `Learner`: functions `(output, target) -> scalar tensor`, averaged over samples."""

from __future__ import annotations

from typing import Any

import torch

from mixprec.learner.model_output import logits_of

__all__ = ["accuracy"]


def accuracy(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Fraction of predictions whose highest-scoring class (last dim of the output's logits) is
    `target`; over every position for sequence outputs. Takes a tensor or a `ModelOutput`."""
    return (logits_of(output).argmax(dim=-1) == target).float().mean()
