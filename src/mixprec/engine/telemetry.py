"""Telemetry: per-step loss scale, overflow flag, gradient norm and non-finite count, written on
the device and read back every `every` steps, so recording costs no host synchronisation.

    telemetry = Telemetry(every=50).attach(opt)   # opt: MixedPrecisionOptimizer/AutocastOptimizer
    for x, y in data:
        ...; opt.step(); opt.zero_grad()          # each step writes one row on the device
    telemetry.flush()                             # read back what is left (one host sync)
    telemetry.rows[-1]                            # TelemetryRow(step, loss_scale, overflow, ...)

The engines call `record_` once per step, just after the overflow check and before their one
host sync; with the default `NO_TELEMETRY` that call does nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "FIELDS",
    "NO_TELEMETRY",
    "NoTelemetry",
    "Telemetry",
    "TelemetryReader",
    "TelemetryRow",
    "follow",
    "grad_stats",
]

FIELDS: tuple[str, ...] = ("step", "loss_scale", "overflow", "grad_norm", "nonfinite")
"""The columns of a telemetry row, in order."""

GradsFn = Callable[[], Sequence[torch.Tensor]]


class TelemetryRow(NamedTuple):
    """One optimizer step."""

    step: int  # index of the step among those recorded (shifted by a reader's offset)
    loss_scale: float  # the scale the step's loss was multiplied by
    overflow: bool  # an inf/nan gradient: the step was skipped
    grad_norm: float  # global 2-norm of the unscaled gradients, before clipping
    nonfinite: int  # inf/nan gradient values (exact below 2**24)


def grad_stats(
    grads: Sequence[torch.Tensor], grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global 2-norm of `grads` / `grad_scale`, count of inf/nan values), as 0-dim fp32
    tensors on the first gradient's device. Norms are accumulated in fp32, so half gradients
    do not overflow the norm. No host synchronisation."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    if not by_device:
        zero = torch.zeros(())
        return zero, zero.clone()
    device = next(iter(by_device))
    norms, counts = [], []
    for tensors in by_device.values():
        norms.extend(n.to(device) for n in torch._foreach_norm(tensors, 2, dtype=torch.float32))
        # g * 0 is 0 where g is finite and nan where it is not; counting the non-zeros is
        # several times faster on a CPU than summing the boolean mask of isfinite(g)
        counts.extend(torch.count_nonzero(z).to(device) for z in torch._foreach_mul(tensors, 0.0))
    norm = torch.linalg.vector_norm(torch.stack(norms)) / grad_scale
    return norm, torch.stack(counts).sum().float()


class NoTelemetry:
    """Telemetry turned off: every method does nothing. The engines' default."""

    enabled = False
    steps = 0
    rows: tuple[TelemetryRow, ...] = ()

    def record_(
        self, found_inf: torch.Tensor, scale: float, grads: GradsFn, grad_scale: float = 1.0
    ) -> None:
        """Nothing to record."""

    def flush(self) -> list[TelemetryRow]:
        """Nothing to read."""
        return []

    def __repr__(self) -> str:
        return "NO_TELEMETRY"


NO_TELEMETRY = NoTelemetry()
"""The one "off" object."""


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"every must be an integer >= 1 (steps between read-backs); got {every!r}."
        )
    return every


class Telemetry:
    """Records one row per optimizer step into a preallocated `(every, 4)` fp32 tensor on the
    gradients' device with tensor ops only, and copies it to `rows` (one host sync) when full
    or on `flush()`. Give each optimizer its own.

    A recorded step costs a few small kernels and one extra read of the gradients (the norm
    and the non-finite count); with telemetry off (`NO_TELEMETRY`) it costs nothing.
    """

    enabled = True

    def __init__(self, every: int = 50) -> None:
        self.every = _check_every(every)
        self.rows: list[TelemetryRow] = []
        self.steps = 0  # steps recorded, flushed or not (a host count: no sync)
        self._buffer: torch.Tensor | None = None
        self._pending = 0  # rows written to the buffer since the last flush

    def attach(self, optimizer: Any) -> Telemetry:
        """Make `optimizer` (a MixedPrecisionOptimizer or AutocastOptimizer) record into this
        telemetry; returns self."""
        if not hasattr(optimizer, "telemetry"):
            raise TypeError(
                "telemetry records the steps of a MixedPrecisionOptimizer or an "
                f"AutocastOptimizer; got {type(optimizer).__name__}."
            )
        optimizer.telemetry = self
        return self

    def record_(
        self, found_inf: torch.Tensor, scale: float, grads: GradsFn, grad_scale: float = 1.0
    ) -> None:
        """Write one step's row on the device: the loss scale `scale`, the overflow flag
        `found_inf` (1-element tensor), and the norm and non-finite count of `grads()`
        divided by `grad_scale` (the factor they still carry). No host sync but every
        `every` steps."""
        if self._buffer is None or self._buffer.device != found_inf.device:
            self.flush()
            self._buffer = torch.zeros(self.every, 4, device=found_inf.device)
        norm, count = grad_stats(grads(), grad_scale)
        row = self._buffer[self._pending]
        row[0].fill_(scale)  # a host number written into device memory: no sync
        row[1:].copy_(torch.stack([found_inf.reshape(()).float(), norm.to(row), count.to(row)]))
        self._pending += 1
        self.steps += 1
        if self._pending == self.every:
            self.flush()

    def flush(self) -> list[TelemetryRow]:
        """Copy the rows recorded since the last flush to `rows` (one host sync) and return them."""
        if not self._pending:
            return []
        values = self._buffer[: self._pending].tolist()  # the one sync per `every` steps
        first = self.steps - self._pending
        new = [
            TelemetryRow(first + i, scale, bool(overflow), norm, int(count))
            for i, (scale, overflow, norm, count) in enumerate(values)
        ]
        self.rows.extend(new)
        self._pending = 0
        return new

    def reader(self, offset: int = 0, start: int = 0) -> TelemetryReader:
        """A reader of the rows from step `start` on, with `offset` added to their steps."""
        return TelemetryReader(self, offset, start)

    def state_dict(self) -> dict[str, Any]:
        """`every`, the step count and the rows (flushed first), as plain values."""
        self.flush()
        return {"every": self.every, "steps": self.steps, "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` returned; keys added by newer versions are ignored."""
        if not isinstance(state, Mapping) or "rows" not in state:
            raise ValueError(
                "expected a Telemetry state_dict (a mapping with at least 'rows'); got "
                f"{type(state).__name__}."
            )
        self.flush()
        self.rows = [TelemetryRow(*r[: len(FIELDS)]) for r in state["rows"]]
        self.steps = int(state.get("steps", len(self.rows)))

    def __repr__(self) -> str:
        return f"Telemetry(every={self.every}, steps={self.steps})"


class TelemetryReader:
    """Reads the rows of a `Telemetry` from step `start` on that it has not read yet, their
    steps shifted by `offset` (e.g. to number them as a Learner does)."""

    def __init__(self, telemetry: Telemetry, offset: int = 0, start: int = 0) -> None:
        self.telemetry = telemetry
        self.offset = int(offset)
        self._next = max(0, int(start))  # rows[i] is step i

    def read(self) -> list[TelemetryRow]:
        """Flush the telemetry (one host sync) and return the rows this reader has not seen."""
        self.telemetry.flush()
        rows = self.telemetry.rows[self._next :]
        self._next = len(self.telemetry.rows)
        return [r._replace(step=r.step + self.offset) for r in rows]


def follow(reader: TelemetryReader | None, optimizer: Any, step: int) -> TelemetryReader | None:
    """A reader of `optimizer`'s telemetry from its latest row on, numbering that row `step`:
    `reader` if it already reads that telemetry (or telemetry is off), else a new one. No
    host sync."""
    telemetry = getattr(optimizer, "telemetry", NO_TELEMETRY)
    if not telemetry.enabled or (reader is not None and reader.telemetry is telemetry):
        return reader
    latest = telemetry.steps - 1
    return telemetry.reader(offset=step - latest, start=latest)
