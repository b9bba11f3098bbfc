"""Loss scaling: static or dynamic, with the fused overflow check and unscale."""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from mixprec.core import native
from mixprec.core.checks import real_number

__all__ = ["SUM_CHECK_MIN_NUMEL", "LossScaler", "check_finite_", "unscale_and_check_"]

LossScale = float | Literal["dynamic"]


def unscale_and_check_(grads: Iterable[torch.Tensor], inv_scale: float) -> torch.Tensor | None:
    """Multiply `grads` in place by `inv_scale` and return a 1-element float tensor, 1.0 if any
    value was inf or nan; None if there were no grads.

    One fused kernel per device; no host synchronisation.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    if not by_device:
        return None
    found = []
    for device, tensors in by_device.items():
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), inv_scale, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, inv)
        found.append(found_inf)
    if len(found) == 1:
        return found[0]
    first = found[0]
    return torch.stack([f.to(first.device) for f in found]).amax().reshape(1)


SUM_CHECK_MIN_NUMEL = 1 << 15
"""Without the native check, CPU bf16/fp32 gradients at least this long are summed."""


def _summable(g: torch.Tensor) -> bool:
    # fp16 is left out: its sum is an fp16 number, which finite scaled gradients overflow
    return (
        g.device.type == "cpu"
        and g.dtype in (torch.bfloat16, torch.float32)
        and g.numel() >= SUM_CHECK_MIN_NUMEL
    )


def _native_checkable(g: torch.Tensor) -> bool:
    return g.device.type == "cpu" and g.is_contiguous() and g.dtype in native.CHECK_DTYPES


def _partition(
    grads: Sequence[torch.Tensor], test: Callable[[torch.Tensor], bool]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    yes: list[torch.Tensor] = []
    no: list[torch.Tensor] = []
    for g in grads:
        (yes if test(g) else no).append(g)
    return yes, no


def check_finite_(grads: Sequence[torch.Tensor], found_inf: torch.Tensor) -> None:
    """Set `found_inf` (a 1-element fp32 tensor on the gradients' device) to 1.0 if any of
    `grads` holds an inf or nan; leave it as it is otherwise. Finite values are left as they
    are.

    On CPU, mixprec's native check reads each gradient once (`mixprec.core.native`). Without
    it, large bf16/fp32 gradients are summed (a read, where the fused check of
    `unscale_and_check_` also writes them back): an inf or nan makes the sum non-finite, and a
    non-finite sum of finite values (the sum overflowed) is told apart by the fused check, so
    the answer is exactly the fused check's. Reading that sum is a host read only on CPU.
    """
    if native.library() is not None:
        checked, grads = _partition(grads, _native_checkable)
        if checked and native.any_nonfinite(checked):
            found_inf.fill_(1.0)
    summed, rest = _partition(grads, _summable)
    if not grads:
        return
    one = torch.ones(1, dtype=torch.float32, device=found_inf.device)
    if rest:
        torch._amp_foreach_non_finite_check_and_unscale_(rest, found_inf, one)
    if summed:
        total = torch.stack([g.sum() for g in summed]).float().sum()
        if not bool(torch.isfinite(total)):
            torch._amp_foreach_non_finite_check_and_unscale_(summed, found_inf, one)


# A loss scale and its inverse (the unscale factor) must both be normal fp32 numbers.
SCALE_RANGE = (2.0**-126, 2.0**126)


def _check_positive_finite(name: str, value: Any) -> float:
    number = real_number(value)  # numpy numbers and 0-d tensors too
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    return number


def _check_scale(name: str, value: Any) -> float:
    number = _check_positive_finite(name, value)
    low, high = SCALE_RANGE
    if not low <= number <= high:
        raise ValueError(
            f"{name} must lie in [2**-126, 2**126] (about [1.2e-38, 8.5e37]), so that fp32 "
            f"holds it and its inverse; got {value!r}. Typical scales are 1 to 2**24."
        )
    return number


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


class LossScaler:
    """Scales the loss so that small half-precision gradients do not flush to zero.

    The loop it drives::

        scaler = LossScaler("dynamic")
        (loss.float() * scaler.scale).backward()
        found_inf = unscale_and_check_(grads, 1.0 / scaler.scale)   # no host sync
        overflow = bool(found_inf.item())                           # the one sync per step
        if not overflow:
            optimizer.step()
        scaler.update(overflow)

    `loss_scale` is a positive finite number (static scaling at that value) or "dynamic".
    Dynamic: an overflow skips the step and, once `hysteresis` overflows have been seen,
    multiplies the scale by `backoff_factor` (never below `min_scale`); `growth_interval`
    clean steps in a row multiply it by `growth_factor` (never above `max_scale`).
    Static scaling skips overflowing steps too, but keeps the scale.
    `floor_patience` consecutive overflows at the minimum scale (under static scaling: at
    the fixed scale) raise a FloatingPointError rather than training on nothing.
    """

    def __init__(
        self,
        loss_scale: LossScale = "dynamic",
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        floor_patience: int = 20,
    ) -> None:
        if isinstance(loss_scale, str):
            if loss_scale != "dynamic":
                raise ValueError(
                    f'loss_scale must be a positive finite number or "dynamic"; got {loss_scale!r}.'
                )
            self.dynamic = True
        else:
            loss_scale = _check_scale("loss_scale", loss_scale)
            self.dynamic = False
        self.init_scale = _check_scale("init_scale", init_scale)
        self.growth_factor = _check_positive_finite("growth_factor", growth_factor)
        if self.growth_factor < 1.0:
            raise ValueError(f"growth_factor must be >= 1; got {growth_factor!r}.")
        self.backoff_factor = _check_positive_finite("backoff_factor", backoff_factor)
        if self.backoff_factor >= 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1); got {backoff_factor!r}.")
        self.growth_interval = _check_count("growth_interval", growth_interval)
        self.hysteresis = _check_count("hysteresis", hysteresis)
        self.floor_patience = _check_count("floor_patience", floor_patience)
        self.min_scale = _check_scale("min_scale", min_scale)
        self.max_scale = _check_scale("max_scale", max_scale)
        if self.min_scale > self.max_scale:
            raise ValueError(
                f"min_scale must be <= max_scale; got min_scale={min_scale!r}, "
                f"max_scale={max_scale!r}."
            )
        if self.dynamic and not self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(
                f"init_scale must lie in [min_scale, max_scale] = [{min_scale}, {max_scale}]; "
                f"got {init_scale!r}."
            )
        self._scale = self.init_scale if self.dynamic else float(loss_scale)
        self._growth_tracker = 0
        self._hysteresis_left = self.hysteresis
        self.steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._floor_overflows = 0

    @property
    def scale(self) -> float:
        """The current loss scale."""
        return self._scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return `loss` in fp32 times the current scale."""
        return loss.float() * self._scale

    def update(self, found_inf: bool) -> None:
        """Record one step: `found_inf` True means its gradients overflowed and it was skipped.

        Raises FloatingPointError after `floor_patience` consecutive overflows at the floor.
        """
        self.steps += 1
        if not found_inf:
            self.consecutive_skips = 0
            self._floor_overflows = 0
            if self.dynamic:
                self._growth_tracker += 1
                if self._growth_tracker >= self.growth_interval:
                    self._scale = min(self._scale * self.growth_factor, self.max_scale)
                    self._growth_tracker = 0
                    self._hysteresis_left = self.hysteresis
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        at_floor = not self.dynamic or self._scale <= self.min_scale
        self._floor_overflows = self._floor_overflows + 1 if at_floor else 0
        if self.dynamic:
            self._growth_tracker = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
                self._hysteresis_left = self.hysteresis
        if self._floor_overflows >= self.floor_patience:
            raise FloatingPointError(self._floor_message())

    def _floor_message(self) -> str:
        where = (
            f"at the minimum loss scale {self.min_scale}"
            if self.dynamic
            else f"at the static loss scale {self._scale}"
        )
        return (
            f"gradients overflowed (inf/nan) on {self._floor_overflows} consecutive steps {where} "
            f"(step {self.steps}, {self.skipped_steps} skipped in all): nothing is being trained. "
            "Try: bf16 (dtype=torch.bfloat16), a lower learning rate, gradient clipping (clip=1.0), "
            "a smaller or dynamic loss scale, keeping more layers in fp32, or checking the data "
            "and loss for inf/nan."
        )

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain numbers."""
        return {
            "dynamic": self.dynamic,
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_left": self._hysteresis_left,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "floor_overflows": self._floor_overflows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state from `state_dict()`; keys added by newer versions are ignored.
        Every value is checked before any is set.

        This scaler's settings win over the saved scale: under static scaling the scale is
        the `loss_scale` this scaler was built with (a different saved one is warned about);
        under dynamic scaling the saved scale is clamped into [min_scale, max_scale] (warned
        about too). Built as the one that saved it, the resume is exact."""
        if not isinstance(state, Mapping) or "scale" not in state:
            raise ValueError(
                "expected a LossScaler state_dict (a mapping with at least 'scale'); "
                f"got {type(state).__name__}."
            )
        saved_dynamic = state.get("dynamic", self.dynamic)
        if not isinstance(saved_dynamic, bool):
            raise ValueError(f"state_dict['dynamic'] must be True or False; got {saved_dynamic!r}.")
        if saved_dynamic != self.dynamic:
            raise ValueError(
                f"state_dict is from a {'dynamic' if saved_dynamic else 'static'} scaler but this "
                f"one is {'dynamic' if self.dynamic else 'static'}; build the scaler with the "
                "same loss_scale mode as the one that was saved."
            )
        try:
            scale = _check_scale("scale", state["scale"])
        except ValueError as error:
            raise ValueError(f"state_dict: {error}") from None
        counts = {}
        for key, default, minimum in (
            ("growth_tracker", 0, 0),
            ("hysteresis_left", self.hysteresis, 0),
            ("steps", 0, 0),
            ("skipped_steps", 0, 0),
            ("consecutive_skips", 0, 0),
            ("floor_overflows", 0, 0),
        ):
            try:
                counts[key] = _check_count(key, state.get(key, default), minimum)
            except ValueError as error:
                raise ValueError(f"state_dict: {error}") from None
        if not self.dynamic and scale != self._scale:
            warnings.warn(
                f"the saved static loss scale {scale} differs from this scaler's loss_scale="
                f"{self._scale}; keeping {self._scale} (build it with loss_scale={scale} to "
                "resume exactly).",
                RuntimeWarning,
                stacklevel=2,
            )
            scale = self._scale
        elif self.dynamic and not self.min_scale <= scale <= self.max_scale:
            clamped = min(max(scale, self.min_scale), self.max_scale)
            warnings.warn(
                f"the saved dynamic loss scale {scale} lies outside this scaler's [min_scale, "
                f"max_scale] = [{self.min_scale}, {self.max_scale}]; using {clamped}.",
                RuntimeWarning,
                stacklevel=2,
            )
            scale = clamped
        self._scale = scale
        self._growth_tracker = counts["growth_tracker"]
        self._hysteresis_left = counts["hysteresis_left"]
        self.steps = counts["steps"]
        self.skipped_steps = counts["skipped_steps"]
        self.consecutive_skips = counts["consecutive_skips"]
        self._floor_overflows = counts["floor_overflows"]

    def __repr__(self) -> str:
        mode = "dynamic" if self.dynamic else "static"
        return (
            f"LossScaler({mode}, scale={self._scale}, steps={self.steps}, "
            f"skipped_steps={self.skipped_steps})"
        )
