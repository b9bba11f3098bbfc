"""`MixedPrecisionAccelerator`: Accelerate's `Accelerator` with mixprec doing the precision.

A `MixedPrecisionOptimizer` works under the stock `Accelerator(mixed_precision="no")` in
bf16: `accelerator.backward(loss)` is a plain backward, whose gradients the engine takes as
unscaled; `accelerator.clip_grad_norm_(model.parameters(), ...)` clips the bf16 gradients;
`accelerator.accumulate(model)` divides the loss and steps on the last micro-batch. This
subclass routes the same calls through the engine instead::

    from mixprec.integrations.accelerate import MixedPrecisionAccelerator

    accelerator = MixedPrecisionAccelerator(gradient_accumulation_steps=2)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), model=model,
                                  dtype=torch.float16)      # or torch.bfloat16
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))     # loss-scaled, fp32 accumulation
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)  # fp32 masters, true norm
            opt.step()                                     # skipped if a gradient overflowed
            sched.step()                                   # not advanced on a skipped step
            opt.zero_grad()

What it adds: `backward` scales the loss by the engine's loss scale (needed for fp16) and
sums micro-batches in the fp32 master gradients; `clip_grad_norm_` over the engine's
parameters unscales into the fp32 masters, clips them there and returns the true norm (as
a tensor); a prepared mixprec optimizer reports its skipped steps through
`step_was_skipped`, so `accelerator.optimizer_step_was_skipped` and prepared schedulers see
them. mixprec does the precision: the accelerator refuses `mixed_precision` other than "no".
Import this module only where Accelerate is installed (`pip install -e '.[hf]'`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["MixedPrecisionAccelerator", "engine_of"]

# Where the engine cannot stand in for Accelerate's own gradient handling.
_UNSUPPORTED = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)


def engine_of(optimizer: Any) -> MixedPrecisionOptimizer | None:
    """The `MixedPrecisionOptimizer` inside `optimizer` (itself, or under Accelerate's
    `AcceleratedOptimizer` wrappers), or None."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, MixedPrecisionOptimizer) else None


class AcceleratedMixedPrecisionOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper around a `MixedPrecisionOptimizer`, whose
    `step_was_skipped` is the engine's (Accelerate's own reads only its GradScaler)."""

    @property
    def step_was_skipped(self) -> bool:
        engine = engine_of(self.optimizer)
        return engine is not None and engine.step_was_skipped


class MixedPrecisionAccelerator(Accelerator):
    """An `Accelerator` whose backward, gradient clipping and skipped steps go through a
    prepared `MixedPrecisionOptimizer` (see the module docstring); with no mixprec optimizer
    prepared it is the stock `Accelerator`. Takes the `Accelerator` arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_accelerator(self)

    def prepare_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None
    ) -> torch.optim.Optimizer:
        """Accelerate's `prepare_optimizer`; a mixprec optimizer comes back in a wrapper that
        reports the engine's skipped steps."""
        if engine_of(optimizer) is None or isinstance(optimizer, AcceleratedOptimizer):
            return super().prepare_optimizer(optimizer, device_placement)
        placement = self.device_placement if device_placement is None else device_placement
        prepared = AcceleratedMixedPrecisionOptimizer(
            optimizer, device_placement=placement, scaler=self.scaler
        )
        self._optimizers.append(prepared)
        return prepared

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward of `loss` divided by the accumulation steps, scaled by the prepared mixprec
        optimizer's loss scale; several calls before `step()` accumulate in fp32."""
        engine = self._engine()
        if engine is None:
            super().backward(loss, **kwargs)
            return
        engine.backward(loss / self.gradient_accumulation_steps, **kwargs)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2
    ) -> torch.Tensor:
        """Clip to `max_norm` and return the total norm; over the mixprec optimizer's
        parameters, the unscaled fp32 master gradients are clipped and measured."""
        params = list(parameters)
        engine = self._engine()
        if engine is None:
            return super().clip_grad_norm_(params, max_norm, norm_type)
        held = {id(p) for group in engine.model_params for p in group}
        given = {id(p) for p in params}
        if not given & held:
            return super().clip_grad_norm_(params, max_norm, norm_type)
        outside = [p for p in params if id(p) not in held and p.grad is not None]
        if not held <= given or outside:
            raise ValueError(
                "clip_grad_norm_ with a mixprec optimizer clips all of its parameters together, "
                f"in its fp32 masters; got {len(given & held)} of its {len(held)} parameters and "
                f"{len(outside)} others with gradients. Pass model.parameters() (or call "
                "clip_grad_norm_ on the MixedPrecisionOptimizer)."
            )
        return engine.clip_grad_norm_(max_norm, norm_type=norm_type)

    def _engine(self) -> MixedPrecisionOptimizer | None:
        """The one prepared mixprec optimizer, or None; several are refused (a loss is scaled
        for one engine)."""
        engines = [e for e in map(engine_of, self._optimizers) if e is not None]
        if len(engines) > 1:
            raise ValueError(
                f"MixedPrecisionAccelerator scales each loss for one MixedPrecisionOptimizer; "
                f"{len(engines)} are prepared. Wrap all parameter groups in one optimizer, or "
                "call opt.backward(loss) and opt.clip_grad_norm_(...) on each yourself."
            )
        return engines[0] if engines else None


def check_accelerator(accelerator: Accelerator) -> None:
    """Raise a ValueError unless mixprec can do `accelerator`'s precision: its own
    mixed precision off, and not a DeepSpeed, Megatron-LM or XLA run."""
    if accelerator.mixed_precision != "no":
        raise ValueError(
            "mixprec does the mixed precision (the MixedPrecisionOptimizer's dtype); got "
            f"mixed_precision={accelerator.mixed_precision!r}. Pass mixed_precision='no' "
            "(TrainingArguments: leave bf16 and fp16 False)."
        )
    if accelerator.distributed_type in _UNSUPPORTED:
        raise ValueError(
            f"{accelerator.distributed_type} steps its own optimizer and gradients; mixprec "
            "cannot run inside it. Use DDP (multi-GPU/multi-CPU) or a single process."
        )
