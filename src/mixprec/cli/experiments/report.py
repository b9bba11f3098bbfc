"""Summaries of repeated runs: mean ± std per (task, precision), as rows, a table and curves."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixprec.cli.experiments.loop import RunRecord

__all__ = ["Summary", "format_table", "mean_curve", "summarize"]


@dataclass
class Summary:
    """The runs of one task in one precision, over seeds."""

    task: str
    precision: str
    seeds: list[int]
    accuracies: list[float]
    valid_losses: list[float]
    final_train_loss: float  # mean over seeds of the mean loss of the last 10% of steps
    seconds: float  # mean per run
    skipped_steps: float  # mean per run
    delta_vs_fp32: float | None = None  # accuracy_mean - the fp32 accuracy_mean, same task

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def accuracy_std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: task, precision, accuracy_mean, accuracy_std first, then the rest."""
        return {
            "task": self.task,
            "precision": self.precision,
            "accuracy_mean": round(self.accuracy_mean, 5),
            "accuracy_std": round(self.accuracy_std, 5),
            "seeds": self.seeds,
            "accuracies": [round(a, 5) for a in self.accuracies],
            "valid_loss_mean": round(statistics.fmean(self.valid_losses), 5),
            "final_train_loss": round(self.final_train_loss, 5),
            "delta_vs_fp32": None if self.delta_vs_fp32 is None else round(self.delta_vs_fp32, 5),
            "seconds_mean": round(self.seconds, 2),
            "skipped_steps_mean": self.skipped_steps,
        }


def _tail_mean(losses: Sequence[float]) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return statistics.fmean(tail) if tail else float("nan")


def summarize(records: Sequence[RunRecord]) -> list[Summary]:
    """Group runs by (task, precision), in order of first appearance."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.precision), []).append(r)
    rows = [
        Summary(
            task=task,
            precision=precision,
            seeds=[r.seed for r in runs],
            accuracies=[r.accuracy for r in runs],
            valid_losses=[r.valid_loss for r in runs],
            final_train_loss=statistics.fmean(_tail_mean(r.losses) for r in runs),
            seconds=statistics.fmean(r.seconds for r in runs),
            skipped_steps=statistics.fmean(r.skipped_steps for r in runs),
        )
        for (task, precision), runs in groups.items()
    ]
    reference = {row.task: row.accuracy_mean for row in rows if row.precision == "fp32"}
    for row in rows:
        if row.task in reference:
            row.delta_vs_fp32 = row.accuracy_mean - reference[row.task]
    return rows


def format_table(rows: Sequence[Summary]) -> str:
    """A Markdown table: accuracy mean ± std (percent), its gap to fp32, losses, time."""
    lines = [
        "| task | precision | seeds | accuracy (%) | vs fp32 (points) | valid loss | final train loss | s/run | skipped steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if r.delta_vs_fp32 is None else f"{100 * r.delta_vs_fp32:+.2f}"
        lines.append(
            f"| {r.task} | {r.precision} | {len(r.seeds)} | {100 * r.accuracy_mean:.2f} ± "
            f"{100 * r.accuracy_std:.2f} | {delta} | {statistics.fmean(r.valid_losses):.4f} | "
            f"{r.final_train_loss:.4f} | {r.seconds:.1f} | {r.skipped_steps:g} |"
        )
    return "\n".join(lines)


def mean_curve(runs: Sequence[RunRecord], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, min, max) over runs of the training loss, smoothed by a moving mean of `window`
    steps; runs are cut to the shortest."""
    n = min(len(r.losses) for r in runs)
    curves = np.array([r.losses[:n] for r in runs], dtype=np.float64)
    window = max(1, min(window, n))
    kernel = np.ones(window) / window
    smooth = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
    return smooth.mean(axis=0), smooth.min(axis=0), smooth.max(axis=0)
