"""Checks of what the Learner is given (arguments, batches, metrics), refused before training."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.core.checks import real_number

__all__ = [
    "check_batch",
    "check_class_dim",
    "check_learner_options",
    "check_loss",
    "check_metrics",
    "check_metrics_on",
    "holds_tensor",
]


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


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def check_class_dim(loss_func: Any, output: Any, target: Any) -> None:
    """Refuse a (batch, time, classes) output under cross entropy, which takes the classes in
    dim 1 ((N, C, ...)): torch's own error only says "Expected target size"."""
    if not (loss_func is F.cross_entropy or isinstance(loss_func, nn.CrossEntropyLoss)):
        return
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return
    shape = tuple(output.shape)
    if output.dim() < 3 or tuple(target.shape) != shape[:-1]:
        return
    if tuple(target.shape) == shape[:1] + shape[2:]:  # (N, C, C): either reading fits
        return
    raise ValueError(
        f"loss_func {_name(loss_func)} expects the classes in dim 1, output (N, C, ...) "
        f"against target (N, ...); got output {shape} and target {tuple(target.shape)}, the "
        "classes last, as a sequence model's (batch, time, vocab) logits. Pass "
        "loss_func=model_loss (from mixprec.learner.model_output), which takes (..., classes) "
        "against (...) over every position, or move the classes to dim 1 in a callback's "
        "on_loss_begin (last_output.transpose(1, -1))."
    )


def check_loss(loss_func: Any, output: Any, target: Any) -> torch.Tensor:
    """`loss_func(output, target)`, checked on the first batch: a loss that fails on a model
    output that is not a tensor says what to use, a (batch, time, classes) output under cross
    entropy is refused naming `model_loss`, and a loss that is not one number is refused."""
    check_class_dim(loss_func, output, target)
    try:
        loss = loss_func(output, target)
    except (TypeError, AttributeError) as e:
        if isinstance(output, torch.Tensor):
            raise
        raise TypeError(
            f"loss_func {_name(loss_func)} failed on the model's output, a "
            f"{type(output).__name__}: {e}. For a model that returns a ModelOutput (Hugging "
            "Face), pass loss_func=model_loss (from mixprec.learner.model_output), or take "
            "the logits in a callback's on_loss_begin."
        ) from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (
            f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        )
        raise TypeError(
            f"loss_func {_name(loss_func)} must return a one-element tensor (a mean loss); got "
            f"{got}. Reduce it (e.g. reduction='mean')."
        )
    return loss


@torch.no_grad()
def check_metrics_on(metrics: list[Any], output: Any, target: Any) -> None:
    """Run each metric once on a training batch's output, as validate() will: one that fails
    or gives more than one number raises now, not after the first epoch."""
    for m in metrics:
        try:
            value = m(output, target)
        except Exception as e:
            raise TypeError(
                f"metric {_name(m)} failed on the first training batch (validate() would fail "
                f"after the epoch): {type(e).__name__}: {e}. A metric is called "
                f"metric(output, target) with what the loss gets: here a "
                f"{type(output).__name__} and a {type(target).__name__}."
            ) from e
        if torch.as_tensor(value).numel() != 1:
            raise TypeError(
                f"metric {_name(m)} must return one number per batch; got shape "
                f"{tuple(torch.as_tensor(value).shape)} on the first training batch."
            )


def check_learner_options(
    opt_func: Any, loss_func: Any, wd: Any, path: Any, model_dir: Any
) -> None:
    """Refuse the Learner's arguments that would fail only later, inside fit or save."""
    if not callable(opt_func):
        raise TypeError(
            "opt_func must be a callable opt_func(param_groups, lr=lr) returning a "
            f"torch.optim.Optimizer, e.g. torch.optim.AdamW; got {opt_func!r}."
        )
    if not callable(loss_func):
        raise TypeError(
            "loss_func must be a callable loss_func(output, target) returning a scalar "
            f"tensor, e.g. torch.nn.functional.cross_entropy; got {loss_func!r}."
        )
    if wd is not None:
        number = real_number(wd)
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"wd must be None or a finite number >= 0; got {wd!r}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory); got {path!r}.")
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(
            "model_dir must be a str or os.PathLike (the folder under path for checkpoints, "
            f"default 'models'); got {model_dir!r}."
        )
