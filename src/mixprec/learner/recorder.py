"""`Recorder`: the per-step and per-epoch history of a `Learner`, and its plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mixprec.core.figures import save_figure
from mixprec.engine.telemetry import TelemetryReader, follow
from mixprec.learner.callback import Callback
from mixprec.learner.schedule import get_momentum

__all__ = ["Recorder", "plot_runs"]

_LINE_STYLES = ("-", "--", ":", "-.")
_HISTORY = (
    "losses",
    "lrs",
    "moms",
    "loss_scales",
    "skipped",
    "val_losses",
    "metrics",
    "epoch_ends",
    "telemetry_steps",
    "grad_norms",
    "nonfinite",
)  # the lists of the state_dict, in its (stable) key order


class Recorder(Callback):
    """Keeps what training did, across `fit()` calls.

    Per step: `losses` (the loss function's value, never the scaled loss), `lrs` and `moms`
    (the lr and momentum, Adam's beta1 or SGD's, of the last param group; `plot_lr` draws
    them), `loss_scales` (after the step's scaler update; None without mixed
    precision) and `skipped` (True where an overflow skipped the step). Per epoch:
    `val_losses` and `metrics` (one list of metric values per epoch).

    With telemetry on (`to_fp16(telemetry=N)`), read back at each epoch end: per recorded
    step, `telemetry_steps` (its number, as in `losses`), `grad_norms` (unscaled, before
    clipping) and `nonfinite` (inf/nan gradient values).

    The losses stay on the device as they are recorded and come back in one `.tolist()` at
    each epoch end, when `losses` is read, and every `postfix_every` steps while a progress
    bar is shown (its postfix: the latest loss), so recording costs no host sync per step.
    """

    order = -10  # first, so later callbacks can read what this step recorded
    postfix_every = 20  # steps between progress-bar refreshes (each reads the losses back)

    def __init__(self) -> None:
        self._losses: list[float] = []  # read back
        self._pending: list[torch.Tensor] = []  # detached, on the device, not read back yet
        self.lrs: list[float] = []
        self.moms: list[float | None] = []
        self.loss_scales: list[float | None] = []
        self.skipped: list[bool] = []
        self.val_losses: list[float] = []
        self.metrics: list[list[float]] = []
        self.epoch_ends: list[int] = []  # number of steps done at each epoch end
        self.telemetry_steps: list[int] = []
        self.grad_norms: list[float] = []
        self.nonfinite: list[int] = []
        self._telemetry: TelemetryReader | None = None

    @property
    def losses(self) -> list[float]:
        """The loss of every step (read back now: one host sync if some are not yet)."""
        self.flush()
        return self._losses

    @losses.setter
    def losses(self, values: list[float]) -> None:
        self._pending = []
        self._losses = list(values)

    @property
    def steps(self) -> int:
        """Steps recorded (no host sync)."""
        return len(self._losses) + len(self._pending)

    def flush(self) -> None:
        """Read back the losses still on the device, in one host sync."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._losses.extend(torch.stack(pending).tolist())  # stack promotes mixed dtypes

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the gradients overflowed."""
        return sum(self.skipped)

    def on_batch_end(
        self,
        learn: Any,
        last_loss: torch.Tensor,
        step_applied: bool = True,
        pbar: Any = None,
        **kwargs: Any,
    ) -> None:
        """Record the step's loss (kept on the device), lr, loss scale and whether it was
        skipped; refresh the progress bar every `postfix_every` steps and at the epoch's last."""
        self._pending.append(last_loss.detach().reshape(()))
        self.lrs.append(float(learn.opt.param_groups[-1]["lr"]))
        self.moms.append(get_momentum(learn.opt.param_groups[-1]))
        scale = getattr(learn.opt, "loss_scale", None)
        self.loss_scales.append(None if scale is None else float(scale))
        self.skipped.append(not step_applied)
        self._telemetry = follow(self._telemetry, learn.opt, self.steps)  # no sync
        if pbar is not None and not getattr(pbar, "disable", False):
            done, total = kwargs.get("num_batch", -1) + 1, getattr(pbar, "total", None)
            if done % self.postfix_every == 0 or done == total:
                self.flush()
                pbar.set_postfix_str(f"loss {self._losses[-1]:.4f}", refresh=False)

    def on_epoch_end(self, last_metrics: list[float] | None = None, **kwargs: Any) -> None:
        """Record the validation loss and metrics, and read back the telemetry."""
        self._read_telemetry()
        self.flush()
        self.epoch_ends.append(len(self._losses))
        if last_metrics:
            self.val_losses.append(float(last_metrics[0]))
            self.metrics.append([float(m) for m in last_metrics[1:]])

    def on_train_end(self, **kwargs: Any) -> None:
        """Read back the telemetry and the losses of the last steps."""
        self._read_telemetry()
        self.flush()

    def _read_telemetry(self) -> None:
        if self._telemetry is not None:
            for row in self._telemetry.read():
                self.telemetry_steps.append(row.step)
                self.grad_norms.append(row.grad_norm)
                self.nonfinite.append(row.nonfinite)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain lists."""
        return {key: list(getattr(self, key)) for key in _HISTORY}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history from `state_dict()`; unknown keys are ignored."""
        for key in _HISTORY:
            if key in state:
                setattr(self, key, list(state[key]))
        self._telemetry = None  # steps are numbered afresh from the restored history

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG of the training loss (validation loss per epoch) and the loss scale."""
        return plot_runs({"train": self}, path, title=title)

    def plot_lr(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG of the lr per step and, where the optimizer has one, the momentum."""
        try:
            from matplotlib.figure import Figure  # the OO API: no pyplot, no global backend
        except ImportError as e:
            raise ImportError(
                "plotting needs matplotlib: pip install -e '.[plot]' in the checkout "
                "(or pip install matplotlib)."
            ) from e
        moms = [(s, m) for s, m in enumerate(self.moms, start=1) if m is not None]
        fig = Figure(figsize=(8, 5 if moms else 3), layout="constrained")
        axes = fig.subplots(2 if moms else 1, 1, sharex=True, squeeze=False)[:, 0]
        axes[0].plot(range(1, len(self.lrs) + 1), self.lrs, lw=1)
        axes[0].set_ylabel("learning rate")
        if moms:
            axes[1].plot(*zip(*moms), lw=1, color="tab:orange")
            axes[1].set_ylabel("momentum")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        return save_figure(fig, path, title)

    def __repr__(self) -> str:
        return (
            f"Recorder(steps={self.steps}, epochs={len(self.epoch_ends)}, "
            f"skipped_steps={self.skipped_steps})"
        )


def plot_runs(
    runs: Mapping[str, Recorder], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write one PNG comparing runs: loss per step (top), loss scale per step (log scale,
    skipped steps marked) and, for runs with telemetry, the unscaled gradient norm per step
    (steps with inf/nan gradients marked). Needs matplotlib (`pip install -e '.[plot]'`)."""
    try:
        from matplotlib.figure import Figure  # the OO API: no pyplot, no global backend
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib: pip install -e '.[plot]' in the checkout "
            "(or pip install matplotlib)."
        ) from e
    telemetry = any(rec.grad_norms for rec in runs.values())
    fig = Figure(figsize=(8, 8 if telemetry else 6), layout="constrained")
    axes = fig.subplots(2 + telemetry, 1, sharex=True, height_ratios=(3, 2, 2)[: 2 + telemetry])
    ax_loss, ax_scale = axes[:2]
    any_scale = False
    for i, (name, rec) in enumerate(runs.items()):
        style = _LINE_STYLES[i % len(_LINE_STYLES)]  # runs that agree would hide each other
        steps = range(1, len(rec.losses) + 1)
        (line,) = ax_loss.plot(steps, rec.losses, style, lw=1, alpha=0.8, label=f"{name} train")
        if rec.val_losses:
            ends = rec.epoch_ends[-len(rec.val_losses) :]
            ax_loss.plot(
                ends, rec.val_losses, "o--", color=line.get_color(), ms=4, label=f"{name} valid"
            )
        scaled = [(s, v) for s, v in zip(steps, rec.loss_scales) if v is not None]
        if scaled:
            any_scale = True
            xs, ys = zip(*scaled)
            ax_scale.step(xs, ys, style, where="post", color=line.get_color(), label=name)
            skips = [
                (s, v)
                for s, v, k in zip(steps, rec.loss_scales, rec.skipped)
                if k and v is not None
            ]
            if skips:
                ax_scale.plot(
                    *zip(*skips), "x", color=line.get_color(), ms=6, label=f"{name} skipped"
                )
        if telemetry and rec.grad_norms:
            _plot_grad_norms(axes[2], rec, name, style, line.get_color())
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize="small")
    ax_loss.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    ax_scale.set_ylabel("loss scale")
    if any_scale:
        ax_scale.set_yscale("log", base=2)
        ax_scale.legend(fontsize="small")
    else:
        ax_scale.text(
            0.5,
            0.5,
            "no loss scaling (fp32)",
            ha="center",
            va="center",
            transform=ax_scale.transAxes,
        )
    ax_scale.grid(alpha=0.3)
    return save_figure(fig, path, title)


def _plot_grad_norms(ax: Any, rec: Recorder, name: str, style: str, color: Any) -> None:
    """The finite gradient norms as a line, each step with inf/nan gradients as a red band."""
    finite = [(s, n) for s, n in zip(rec.telemetry_steps, rec.grad_norms) if math.isfinite(n)]
    if finite:
        ax.plot(*zip(*finite), style, lw=1, color=color, label=f"{name} grad norm")
        ax.set_yscale("log")
    for s, count in zip(rec.telemetry_steps, rec.nonfinite):
        if count:
            ax.axvspan(s - 0.5, s + 0.5, color="red", alpha=0.3, lw=0)
    ax.set_ylabel("grad norm (unscaled)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
