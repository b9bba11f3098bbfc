"""Loss-curve plots of the experiments (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mixprec.cli.experiments.loop import PRECISIONS, RunRecord
from mixprec.cli.experiments.report import mean_curve
from mixprec.core.figures import save_figure

__all__ = ["STYLES", "plot_loss_curves"]

# (color, line style, width): curves that coincide stay visible on top of each other
STYLES = {
    "fp32": ("black", "-", 2.6),
    "fp16": ("tab:blue", "--", 1.6),
    "bf16": ("tab:green", ":", 1.8),
    "fp16-noscale": ("tab:red", "-", 1.4),
}


def plot_loss_curves(
    records: Sequence[RunRecord], path: str | Path, title: str, smooth_steps: int = 20
) -> Path:
    """One panel per task: training loss against step, mean over seeds with a min-max band."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    tasks = list(dict.fromkeys(r.task for r in records))
    fig = Figure(figsize=(max(5.5 * len(tasks), 8), 4.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        runs = [r for r in records if r.task == task]
        for precision in dict.fromkeys(r.precision for r in runs):
            group = [r for r in runs if r.precision == precision]
            mean, low, high = mean_curve(group, smooth_steps)
            # the moving mean of steps [i, i + window) is drawn at its last step
            steps = np.arange(len(mean)) + min(smooth_steps, len(group[0].losses))
            color, style, width = STYLES.get(precision, (None, "-", 1.4))
            seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}"
            label = f"{PRECISIONS[precision].label} ({seeds})"
            ax.plot(steps, mean, color=color, linestyle=style, linewidth=width, label=label)
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel(f"step (loss smoothed over {smooth_steps} steps)")
        ax.set_ylabel("training loss")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=110)
