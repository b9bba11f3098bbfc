"""Models that take a dict of inputs and return a `ModelOutput` (Hugging Face style), used
as they are: `call_model` passes a dict batch as keyword arguments, `logits_of` takes the
logits out of the output, and `model_loss` is a `loss_func` that uses the model's own loss
when it returned one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["call_model", "logits_of", "model_loss"]


def call_model(model: nn.Module, x: Any) -> Any:
    """`model(**x)` for a dict batch input (`input_ids`, `attention_mask`, ...), else `model(x)`."""
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def logits_of(output: Any) -> Any:
    """The logits of a model's output: `output.logits` (or `output["logits"]`) of a
    `ModelOutput` or dict; the output itself otherwise (a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(
            f"the model returned a {type(output).__name__}, which holds no logits; return a "
            "tensor, or an output with a .logits field (or a 'logits' key)."
        )
    return logits


def model_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """The model's own loss (`output.loss`) when it returned one (labels were in its input),
    else the cross entropy of its logits against `target` over every position: logits of
    shape (..., classes), target of shape (...)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is not None:
        return loss.float()
    logits = logits_of(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
