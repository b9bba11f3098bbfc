"""A plain training loop over the public engine API, shared by the experiments."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixprec.core.convert import cast_floats, model_to_half
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["PRECISIONS", "Precision", "RunRecord", "Task", "evaluate", "train_run"]

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Precision:
    """How a run trains: the model's dtype and the loss scale (None: plain fp32, no wrapper)."""

    dtype: torch.dtype
    loss_scale: float | str | None
    label: str


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(torch.float32, None, "fp32"),
    "fp16": Precision(torch.float16, "dynamic", "fp16, fp32 masters, dynamic loss scaling"),
    "bf16": Precision(torch.bfloat16, 1.0, "bf16, fp32 masters, no loss scaling"),
    "fp16-noscale": Precision(torch.float16, 1.0, "fp16, fp32 masters, no loss scaling"),
}


@dataclass
class Task:
    """A model, its data and its loss: everything a run needs besides the precision."""

    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[int], Tensors]  # seed -> (x_train, y_train, x_valid, y_valid)
    loss_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # fp32 output, target
    correct: Callable[[torch.Tensor, torch.Tensor], tuple[int, int]]  # -> (right, counted)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    loss_weight: float = 1.0  # the objective is loss_weight * loss; curves record the loss
    chance: float = 0.0  # the accuracy of guessing: a run must beat it to have learned
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    scaler_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """One training run: the training loss of every step and the final validation figures."""

    task: str
    precision: str
    seed: int
    accuracy: float
    valid_loss: float
    losses: list[float]
    skipped_steps: int
    loss_scale: float | None
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)  # kept only on request


def train_run(
    task: Task,
    precision: str,
    seed: int,
    *,
    epochs: int | None = None,
    keep_model: bool = False,
) -> RunRecord:
    """Train `task` from seed `seed` in `precision` (a key of PRECISIONS) with AdamW and a
    one-cycle schedule; `keep_model` keeps the trained model on the record."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}.")
    spec = PRECISIONS[precision]
    epochs = task.epochs if epochs is None else epochs
    x_train, y_train, x_valid, y_valid = task.make_data(seed)
    torch.manual_seed(seed)
    model = task.make_model()
    if spec.loss_scale is not None:
        model_to_half(model, spec.dtype)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(
        model.parameters(), lr=task.lr, weight_decay=task.weight_decay, **task.optimizer_options
    )
    if spec.loss_scale is not None:
        optimizer = MixedPrecisionOptimizer(
            optimizer, spec.loss_scale, flat_master=True, **task.scaler_options
        )
    steps_per_epoch = -(-len(y_train) // task.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=task.lr, total_steps=max(epochs * steps_per_epoch, 1)
    )
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=generator).split(task.batch_size):
            output = model(cast_floats(x_train[batch], spec.dtype))
            loss = task.loss_func(output.float(), y_train[batch])
            objective = loss * task.loss_weight if task.loss_weight != 1.0 else loss
            if isinstance(optimizer, MixedPrecisionOptimizer):
                optimizer.backward(objective)
            else:
                objective.backward()
            applied = optimizer.step()
            if applied is not False:  # schedules advance on applied steps only
                schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    accuracy, valid_loss = evaluate(task, model, x_valid, y_valid, spec.dtype)
    return RunRecord(
        task=task.name,
        precision=precision,
        seed=seed,
        accuracy=accuracy,
        valid_loss=valid_loss,
        losses=losses,
        skipped_steps=getattr(optimizer, "skipped_steps", 0),
        loss_scale=getattr(optimizer, "loss_scale", None),
        seconds=round(seconds, 2),
        model=model if keep_model else None,
    )


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> tuple[float, float]:
    """(accuracy, mean loss) of `model` on `(x, y)`, in batches of the task's batch size."""
    model.eval()
    right = counted = 0
    loss_sum = 0.0
    for idx in torch.arange(len(y)).split(max(task.batch_size, 256)):
        output = model(cast_floats(x[idx], dtype)).float()
        loss_sum += task.loss_func(output, y[idx]).item() * len(idx)
        r, c = task.correct(output, y[idx])
        right, counted = right + r, counted + c
    return right / max(counted, 1), loss_sum / max(len(y), 1)
