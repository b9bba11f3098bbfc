"""mixprec in HF transformers' `Trainer`: `MixedPrecisionCallback` and `MixedPrecisionTrainer`.

The stock Trainer takes a `MixedPrecisionOptimizer` as any optimizer (bf16)::

    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), model=model,
                                  dtype=torch.bfloat16)              # converts the model
    trainer = Trainer(model, TrainingArguments(output_dir), train_dataset=data,
                      optimizers=(opt, None), callbacks=[MixedPrecisionCallback()])
    trainer.train()
    model.save_pretrained(out, state_dict=opt.fp32_state_dict())     # the exact fp32 masters

Its `loss.backward()` gives the engine unscaled bf16 gradients; its `max_grad_norm`
clipping and logged `grad_norm` work on the bf16 gradients (the true norm, rounded to
bf16). `MixedPrecisionCallback` makes a skipped (inf/nan) step visible to the Trainer: its
lr scheduler does not advance on it, and every log line gets the engine's `skipped_steps`
and `loss_scale`.

`MixedPrecisionTrainer` (a `Trainer` subclass, same arguments; the callback included)
routes the step through the engine as well: the loss is scaled by the engine's loss scale
(what fp16 needs), micro-batches accumulate in the fp32 master gradients, `max_grad_norm`
clips the unscaled fp32 master gradients and the logged `grad_norm` is their norm, and
`save_model()` and checkpoints hold the fp32 masters rather than the half weights.

mixprec does the precision: leave `TrainingArguments(bf16=False, fp16=False)`. Import this
module only where transformers and Accelerate are installed (`pip install -e '.[hf]'`).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.integrations.accelerate import AcceleratedMixedPrecisionOptimizer, engine_of

__all__ = ["LOGGED", "MixedPrecisionCallback", "MixedPrecisionTrainer"]

LOGGED = ("skipped_steps", "loss_scale")
"""The keys `MixedPrecisionCallback` adds to every Trainer log entry."""


class MixedPrecisionCallback(TrainerCallback):
    """Connects a `MixedPrecisionOptimizer` to the Trainer's step bookkeeping.

    After each optimizer step it tells Accelerate's optimizer wrapper whether the engine
    skipped the step (inf/nan gradients), so the Trainer does not advance its lr scheduler
    on it; each log entry (and `trainer.state.log_history`) gets the engine's
    `skipped_steps` and `loss_scale`. At `train()` it refuses a run mixprec cannot do: no
    mixprec optimizer, the Trainer's own bf16/fp16, or an fp16 engine under the stock
    Trainer (whose backward does not scale the loss: use `MixedPrecisionTrainer`).
    """

    def __init__(self) -> None:
        self.engine: MixedPrecisionOptimizer | None = None
        self._scales_loss = False  # set by MixedPrecisionTrainer, whose compute_loss scales

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Find the engine and check the run."""
        engine = engine_of(optimizer)
        if engine is None:
            raise ValueError(
                "MixedPrecisionCallback needs a MixedPrecisionOptimizer: Trainer(..., "
                "optimizers=(MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "
                f"model=model, dtype=torch.bfloat16), None)); got {type(optimizer).__name__}."
            )
        if args.bf16 or args.fp16:
            raise ValueError(
                "mixprec does the mixed precision (the MixedPrecisionOptimizer's dtype); got "
                f"TrainingArguments(bf16={args.bf16}, fp16={args.fp16}). Leave both False."
            )
        if engine.dtype == torch.float16 and not self._scales_loss:
            raise ValueError(
                "an fp16 MixedPrecisionOptimizer needs its loss scaled, and the stock Trainer's "
                "backward does not scale it: use mixprec.integrations.hf.MixedPrecisionTrainer "
                "(same arguments), or dtype=torch.bfloat16."
            )
        self.engine = engine

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Report the engine's skipped step where the Trainer looks for it."""
        if (
            self.engine is not None
            and isinstance(optimizer, AcceleratedOptimizer)
            and not isinstance(optimizer, AcceleratedMixedPrecisionOptimizer)
        ):
            # Accelerate's step_was_skipped reads this flag, which only its own GradScaler
            # sets; the Trainer steps its lr scheduler unless it is True.
            optimizer._is_overflow = self.engine.step_was_skipped

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add `LOGGED` to the entry being logged and to its copy in `state.log_history`."""
        if self.engine is None or logs is None:
            return
        values = {key: getattr(self.engine, key) for key in LOGGED}
        logs.update(values)
        if state.log_history:  # the Trainer appends its copy of `logs` before on_log
            state.log_history[-1].update(values)


class MixedPrecisionTrainer(Trainer):
    """A `Trainer` whose loss scaling, gradient accumulation, clipping and saved weights go
    through the `MixedPrecisionOptimizer` it is given (see the module docstring); the same
    arguments as `Trainer`, with `MixedPrecisionCallback` added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        missing = [m for m in ("_clip_grad_norm", "_get_grad_norm") if not hasattr(Trainer, m)]
        if missing:
            raise TypeError(
                f"MixedPrecisionTrainer overrides Trainer.{missing[0]}, which this transformers "
                "version lacks; upgrade transformers, or use the stock Trainer with "
                "MixedPrecisionCallback (bf16)."
            )
        super().__init__(*args, **kwargs)
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, MixedPrecisionCallback):
                self.remove_callback(callback)
        callback = MixedPrecisionCallback()
        callback._scales_loss = True
        self.add_callback(callback)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The Trainer's loss; in training, its backward is the engine's scaled backward."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        engine = engine_of(self.optimizer)
        if engine is None or not torch.is_grad_enabled():  # evaluation: nothing to scale
            return out
        loss = out[0] if return_outputs else out
        scaled = engine.scale_loss(loss)
        # The value stays the loss (the Trainer logs it); the gradient is the scaled loss's.
        loss = loss.detach() + (scaled - scaled.detach())
        return (loss, *out[1:]) if return_outputs else loss

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        engine = engine_of(self.optimizer)
        if engine is None:
            return super()._clip_grad_norm(model)
        return engine.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        engine = engine_of(self.optimizer)
        if engine is not None and grad_norm is None:
            grad_norm = engine.clip_grad_norm_(float("inf"))  # the norm, nothing clipped
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        engine = engine_of(self.optimizer)
        if state_dict is None and engine is not None:
            state_dict = engine.fp32_state_dict()
        super()._save(output_dir, state_dict=state_dict)
