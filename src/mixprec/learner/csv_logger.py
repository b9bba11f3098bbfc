"""`CSVLogger`: writes the mixed-precision telemetry of every step to a CSV file."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from mixprec.engine.telemetry import FIELDS, NO_TELEMETRY, TelemetryReader, follow
from mixprec.learner.callback import Callback

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Appends one row per step, `step,loss_scale,overflow,grad_norm,nonfinite`, to
    `learn.path / filename` at each epoch end and when training ends: the rows the engine
    recorded on the device, read back then (no host sync per step).

    Needs telemetry: `learn.to_fp16(telemetry=50)` (read back every 50 steps, and at each
    epoch end). The file is started afresh, with its header, at the first `fit` unless
    `append`; later fits append. Steps are numbered as in `learn.recorder.losses` (from 1).
    """

    order = 100  # after MixedPrecision (99) has built the optimizer at on_train_begin

    def __init__(self, filename: str | os.PathLike = "telemetry.csv", append: bool = False) -> None:
        self.filename = filename
        self.append = bool(append)
        self.path: Path | None = None
        self._reader: TelemetryReader | None = None

    def on_train_begin(self, learn: Any, **kwargs: Any) -> None:
        """Check that telemetry is on; start the file (first fit, unless `append`)."""
        if getattr(learn.opt, "telemetry", NO_TELEMETRY) is NO_TELEMETRY:
            raise ValueError(
                "CSVLogger writes the mixed-precision telemetry, which is off: train with "
                "learn.to_fp16(..., telemetry=50) (or MixedPrecision(..., telemetry=50))."
            )
        if self.path is None:
            self.path = Path(learn.path) / self.filename
            if not self.append or not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(FIELDS)

    def on_batch_end(self, learn: Any, **kwargs: Any) -> None:
        """Follow the optimizer's telemetry (no host sync)."""
        self._reader = follow(
            self._reader, learn.opt, learn.iteration
        )  # counted before on_batch_end

    def on_epoch_end(self, **kwargs: Any) -> None:
        """Write the steps recorded since the last write."""
        self._write()

    def on_train_end(self, **kwargs: Any) -> None:
        """Write what is left (also when fit stopped on an exception)."""
        self._write()

    def _write(self) -> None:
        if self._reader is None or self.path is None:
            return
        rows = self._reader.read()
        if rows:
            with open(self.path, "a", newline="") as f:
                writer = csv.writer(f)
                for r in rows:
                    writer.writerow(
                        [r.step, r.loss_scale, int(r.overflow), r.grad_norm, r.nonfinite]
                    )

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.filename)!r}, append={self.append})"
