"""`OptimizerWrapper`: the loss-scaled step both mixprec engines run, read top to bottom.

`step()` is one sequence over an explicit `StepState`::

    check the call -> notice the gradients (a plain `loss.backward()` counts, unscaled)
      -> fused Adam(W) from the half gradients: check, one sync, then chunk by chunk in cache
         unscale (and clip), update, copy into the model; or
      -> `unscale_()`: gradients into fp32, unscaled and checked; clip
         -> one host sync -> the update strategy, then the copy into the model
      -> the scaler's update

A subclass says where the gradients and weights live (`MixedPrecisionOptimizer`: a half
model and fp32 masters; `AutocastOptimizer`: an fp32 model) through a few layout methods;
the update strategy (`mixprec.engine.updates`) is chosen once, at construction.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mixprec.core.chunked import step_buffers
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.scaler import LossScaler
from mixprec.engine import forensics
from mixprec.engine.fused_items import FusedItem
from mixprec.engine.telemetry import NoTelemetry, Telemetry
from mixprec.engine.updates import Update
from mixprec.parallel.distributed import all_reduce_overflow_

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["OptimizerWrapper", "StepState"]

ORDER = "Expected order: backward(loss) [x N], unscale_() (optional), step(), zero_grad()."


class StepState(enum.Enum):
    """Where a step stands, as `torch.amp.GradScaler`'s per-optimizer state does."""

    READY = "ready"  # no gradient of this step yet
    BACKWARD = "backward"  # this step's gradients in the model's grads
    ACCUMULATING = "accumulating"  # earlier micro-batches' in fp32, the latest in the model's
    UNSCALED = "unscaled"  # unscale_() ran: fp32 gradients unscaled, checked, clipped


class OptimizerWrapper(torch.optim.Optimizer):
    """A loss-scaled wrapper around `self.optimizer`: its param groups, state and defaults are
    the wrapped optimizer's, so lr schedulers (which want a torch Optimizer) drive it.

    Subclasses set the attributes below, call `_init_step()` and `enable_step_hooks(self)`
    instead of `Optimizer.__init__` (which would build param groups of their own), and define
    the layout methods at the end of this class.
    """

    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    clip: float | None
    data_parallel: bool
    process_group: ProcessGroup | None
    telemetry: Telemetry | NoTelemetry
    last_grad_norm: torch.Tensor | None
    last_overflow: forensics.OverflowReport | None
    update: Update  # the update strategy, chosen at construction
    _buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def _init_step(self) -> None:
        self._buffers = None
        self.last_grad_norm = None
        self.last_overflow = None  # of the last skipped step
        self.step_was_skipped = False  # whether the last step() skipped (overflow)
        self._state = StepState.READY
        self._grad_scale = 1.0  # what this step's gradients are multiplied by
        self._found_inf: torch.Tensor | None = None  # set by unscale_(), read by step()
        self._released = False

    # -- the torch.optim.Optimizer surface ------------------------------------------------
    @property
    def fused(self) -> bool:
        """Whether Adam(W) steps run through torch's fused kernel (see the class docstring)."""
        return self.update.fused

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of overflow, since the start of training."""
        return self.scaler.skipped_steps

    @property
    def loss_scale(self) -> float:
        """The current loss scale."""
        return self.scaler.scale

    @property
    def step_state(self) -> StepState:
        """Where the current step stands."""
        return self._state

    # -- the loop ---------------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the fp32 loss times the loss scale, ready for `.backward()`."""
        if self._state is StepState.UNSCALED:
            raise RuntimeError(
                f"unscale_() was already called for this step; call step() "
                f"before the next backward. {ORDER}"
            )
        if self._state is not StepState.READY:
            self._between_backwards()
        else:
            self._state = StepState.BACKWARD
        self._grad_scale = self.scaler.scale
        return self.scaler.scale_loss(loss)

    def backward(self, loss: torch.Tensor, **backward_kwargs: Any) -> None:
        """Backward of the scaled loss; several calls before `step()` accumulate in fp32."""
        self.scale_loss(loss).backward(**backward_kwargs)

    def unscale_(self) -> None:
        """Move the gradients into fp32, unscale them, check them for inf/nan and clip them;
        `step()` does this itself when it was not called. No host sync."""
        with deferred_interrupt():  # the grads moved and the state set together, or neither
            if self._state is StepState.UNSCALED:
                raise RuntimeError(
                    f"unscale_() has already been called since the last step(); call step() "
                    f"next. {ORDER}"
                )
            self._notice_gradients()
            self._unscale()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale the gradients into fp32 (as `unscale_()`) and clip them to the global norm
        `max_norm`, as `torch.nn.utils.clip_grad_norm_` does; return their total norm before
        clipping (inf/nan if they overflowed: then nothing is clipped and step() skips)."""
        if self._state is not StepState.UNSCALED:
            self.unscale_()
        holders = self._clip_holders()
        grads = [h.grad for h in holders if h.grad is not None]
        if not grads:
            return torch.zeros((), device=self._device())
        norm = torch.nn.utils.get_total_norm(grads, norm_type, foreach=None)
        forensics.clip_to_norm_(holders, max_norm, norm)  # no host sync; inf/nan: left as is
        return norm

    def step(self, closure: Callable[[], float] | None = None) -> bool:  # type: ignore[override]
        """Apply the step unless the gradients overflowed; return whether it was applied."""
        if closure is not None:
            raise TypeError(
                f"{type(self).__name__}.step() takes no closure: compute the loss, call "
                "backward(loss), then step()."
            )
        if self._released:
            raise RuntimeError(
                f"this {type(self).__name__} was released (release()): its parameters may be "
                "held by another wrapper now; step that one."
            )
        # A critical section: a Ctrl-C in here is raised once the masters, the model and the
        # scaler agree again (see mixprec.core.interrupts).
        with deferred_interrupt():
            if self._state is not StepState.UNSCALED:
                self._notice_gradients()
            update = self.update.now(self.optimizer, self._device())
            if (
                self._state is StepState.BACKWARD
                and update.reads_half_grads
                and self._step_buffers() is not None
            ):
                overflow = self._fused_step()  # check, sync, then unscale, clip, update in cache
                return self._end_step(overflow)
            if self._state is not StepState.UNSCALED:
                self._unscale()  # gradients into fp32: unscaled, checked, clipped
            assert self._found_inf is not None
            overflow = bool(self._found_inf.item())  # the one host sync of the step
            if overflow:  # only now: forensics cost nothing on clean steps
                self.last_overflow = self._report(from_model_grads=False)
            else:
                try:
                    with torch.no_grad():
                        update.apply(
                            self._fp32_items, self._copy_to_model
                        )  # the update, then the copy
                except BaseException:  # raised inside the update (a hook, out of memory)
                    self._after_failed_step()
                    raise
                if update.fused:
                    self._stepped_fused()
            return self._end_step(overflow)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of the current step."""
        self._zero_grads(set_to_none)
        self._state = StepState.READY
        self._found_inf = None

    # -- the step's parts -------------------------------------------------------------------
    def _notice_gradients(self) -> None:
        """A step with no backward(loss) since the last one steps on what a plain
        `loss.backward()` left in the grads (HF Trainer, Accelerate): unscaled gradients."""
        if self._state in (StepState.READY, StepState.BACKWARD) and not self._has_new_grads():
            # no gradient, no step (weight decay on zeros would still move the weights)
            raise RuntimeError(
                "no gradients to step on: call backward(loss) (or .backward() on "
                f"scale_loss(loss), or loss.backward()) before unscale_() or step(). {ORDER}"
            )
        if self._state is StepState.READY:
            self._state = StepState.BACKWARD
            self._grad_scale = 1.0

    def _unscale(self) -> None:
        """The fp32 gradients of this step, unscaled and checked (`_found_inf` set, reduced
        across ranks, recorded), then clipped to `clip`. A global norm that overflows fp32
        (finite gradients of ~1e19 and more) counts as an overflow: clipping cannot scale
        them, and every path (fused or not, FSDP2's `scaled_step`) skips that step."""
        try:
            found_inf = self._unscale_into_fp32(self._grad_scale)
        except (RuntimeError, NotImplementedError) as error:
            self._refuse_sparse_grads(error)
            raise
        if found_inf is None:
            found_inf = torch.zeros(1, device=self._device())
        norm = None
        if self.clip is not None:
            norm = forensics.total_grad_norm(self._clip_holders())
            found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(norm)).reshape(1)))
        self._all_reduce_overflow(found_inf)
        self.telemetry.record_(found_inf, self._grad_scale, self._fp32_grads)  # before clip
        if norm is not None:
            forensics.clip_to_norm_(self._clip_holders(), self.clip, norm)
            self.last_grad_norm = norm
        self._found_inf = found_inf
        self._state = StepState.UNSCALED

    def _fused_step(self) -> bool:
        """Check, then unscale, clip and Adam(W)-step from the half gradients chunk by chunk in
        cache; return whether a gradient overflowed."""
        assert self._buffers is not None
        scale = self._grad_scale
        items = self._half_items()
        flat = self._zeroes_read_grads()

        def checked(found_inf: torch.Tensor) -> None:  # after the check, before the one sync
            self._all_reduce_overflow(found_inf)
            grads = lambda: [it.grad for group in items for it in group]  # noqa: E731
            self.telemetry.record_(found_inf, scale, grads, grad_scale=scale)

        with torch.no_grad():
            try:
                overflow, norm = self.update.fused_step(
                    items, self._buffers, scale, self.clip, flat, checked
                )
            except BaseException as error:  # raised inside the update: no half-made state
                self._after_failed_step()
                if isinstance(error, (RuntimeError, NotImplementedError)):
                    self._refuse_sparse_grads(error)
                raise
            if norm is not None:
                self.last_grad_norm = norm
            if overflow:  # read the half grads before they are zeroed
                self.last_overflow = self._report(from_model_grads=True)
            else:
                self._stepped_fused()
            self._after_fused_step(overflow)
        return overflow

    def _report(self, from_model_grads: bool) -> forensics.OverflowReport:
        """The skipped step's report: the layout's, marked when only the norm overflowed."""
        report = self._overflow_report(from_model_grads)
        norm = self.last_grad_norm
        if not report.faults and norm is not None and not bool(torch.isfinite(norm)):
            report = dataclasses.replace(report, norm_overflow=True)
        return report

    def _refuse_sparse_grads(self, error: BaseException) -> None:
        """After `error` in the unscale or the fused step: a TypeError naming the parameters
        with sparse gradients, if that was the cause (nothing was stepped)."""
        shapes = [tuple(p.shape) for p in self._params_with_grads() if p.grad.is_sparse]
        if shapes:
            raise TypeError(
                f"{len(shapes)} parameter(s) have sparse gradients (shapes {shapes[:4]}), which "
                "mixed precision cannot unscale, check or copy: an nn.Embedding(sparse=True) or "
                "EmbeddingBag(sparse=True). Build them with sparse=False."
            ) from error

    def _end_step(self, overflow: bool) -> bool:
        """The step's end: the next backward starts a new step; the scaler's update; return
        whether the step was applied."""
        self._after_step()
        self._state = StepState.READY
        self._found_inf = None
        self.step_was_skipped = overflow
        with forensics.naming_overflow(self.last_overflow if overflow else None):
            self.scaler.update(overflow)  # may raise FloatingPointError; the state is consistent
        return not overflow

    # -- shared helpers ---------------------------------------------------------------------
    def _device(self) -> torch.device:
        """The device of the first tensor the wrapped optimizer steps (cpu if none)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _step_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(found_inf, inv_scale, scale), reused every step; None if the tensors the wrapped
        optimizer steps span devices."""
        if self._buffers is None:
            self._buffers = step_buffers(
                [p for group in self.optimizer.param_groups for p in group["params"]]
            )
        return self._buffers

    def _stepped_fused(self) -> None:
        # An lr scheduler built on the wrapped optimizer watches for its step() to warn about
        # a scheduler stepped first; the fused kernel updated its params without calling it.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _all_reduce_overflow(self, found_inf: torch.Tensor) -> None:
        if self.data_parallel:
            all_reduce_overflow_(found_inf, self.process_group)

    # -- the layout: where gradients and weights live (subclasses) -----------------------
    def _between_backwards(self) -> None:
        """A second backward of the same step is about to run."""

    def _has_new_grads(self) -> bool:
        raise NotImplementedError

    def _params_with_grads(self) -> list[torch.Tensor]:
        """The model's parameters that hold a gradient."""
        raise NotImplementedError

    def _unscale_into_fp32(self, scale: float) -> torch.Tensor | None:
        """This step's gradients into fp32, divided by `scale`, checked: found_inf (None: no
        gradient)."""
        raise NotImplementedError

    def _fp32_grads(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _clip_holders(self) -> list[torch.Tensor]:
        """Tensors whose `.grad` is this step's fp32 gradient, for clipping."""
        raise NotImplementedError

    def _half_items(self) -> Sequence[Sequence[FusedItem]]:
        raise NotImplementedError

    def _fp32_items(self) -> Sequence[Sequence[FusedItem]]:
        raise NotImplementedError

    def _copy_to_model(self) -> None:
        """Round the updated fp32 weights into the model (nothing if the model is fp32)."""

    def _zeroes_read_grads(self) -> bool:
        """Whether the fused step zeroes the gradients as it reads them (flat buffers)."""
        return False

    def _after_fused_step(self, overflow: bool) -> None:
        """After the one-pass step: the model's gradients ready for the next backward."""

    def _after_step(self) -> None:
        """After any step, applied or skipped."""

    def _zero_grads(self, set_to_none: bool) -> None:
        raise NotImplementedError

    def _overflow_report(self, from_model_grads: bool) -> forensics.OverflowReport:
        raise NotImplementedError

    def _after_failed_step(self) -> None:
        raise NotImplementedError
