"""`mixprec bench modes`: the digits demo (`mixprec train`) in each precision mode and dtype,
side by side: accuracy, time and memory.

- accuracy: validation accuracy after training (same seed, same batches for every case);
- seconds: median wall time of `fit()` (training and per-epoch validation) over `repeats`
  rounds, the cases run in turn in every round after one untimed warm-up round;
- state bytes: the training state at its peak, just after a step (parameters, gradients,
  fp32 masters and their gradients, optimizer state; each storage once);
- saved bytes: what one forward of a training batch saves for backward, in the mode's own
  region (parameters left out; autocast's half copies of the weights counted).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from mixprec.cli.bench.common import (
    add_common_arguments,
    apply_threads,
    describe_machine,
    format_table,
    print_result,
)
from mixprec.cli.bench.memory import saved_bytes
from mixprec.cli.demo.train import TrainConfig, train_digits
from mixprec.cli.options import comma_list, non_negative_int, positive_int
from mixprec.learner.callback import Callback

__all__ = ["CASES", "add_arguments", "measure", "run", "training_state_bytes"]

CASES: dict[str, tuple[str, str]] = {
    "fp32": ("fp32", "master"),  # no mixed precision: the mode is unused
    "master-fp16": ("fp16", "master"),
    "master-bf16": ("bf16", "master"),
    "autocast-fp16": ("fp16", "autocast"),
    "autocast-bf16": ("bf16", "autocast"),
}
"""Case name -> (precision, mode)."""


def training_state_bytes(learn: Any) -> int:
    """Bytes of the model's parameters, buffers and gradients and of the optimizer's
    parameters (fp32 masters, if any), their gradients and state; each storage once."""
    tensors: list[torch.Tensor] = [*learn.model.parameters(), *learn.model.buffers()]
    tensors += [p.grad for p in learn.model.parameters() if p.grad is not None]
    inner = getattr(learn.opt, "optimizer", learn.opt)
    for group in inner.param_groups:
        for p in group["params"]:
            tensors += [p] if p.grad is None else [p, p.grad]
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _MemoryProbe(Callback):
    """The training state after the first step, and what one forward of the first batch
    saves for backward, measured at the end (leaving the model as it was)."""

    order = 200  # after every other callback: sees the batch as the model does

    def __init__(self) -> None:
        self.state_bytes: int | None = None
        self.saved_bytes: int | None = None
        self._first_input: torch.Tensor | None = None

    def on_batch_begin(self, last_input: Any, **kwargs: Any) -> None:
        if self._first_input is None:
            self._first_input = last_input

    def on_step_end(self, learn: Any, **kwargs: Any) -> None:
        if self.state_bytes is None:
            self.state_bytes = training_state_bytes(learn)

    def on_train_end(self, learn: Any, **kwargs: Any) -> None:
        kept = {k: v.clone() for k, v in learn.model.state_dict().items()}  # BN statistics
        with learn.forward_context():
            self.saved_bytes = saved_bytes(learn.model, self._first_input)
        learn.model.load_state_dict(kept)


def measure(
    epochs: int = 8, repeats: int = 3, seed: int = 0, cases: Sequence[str] = tuple(CASES)
) -> dict[str, Any]:
    """Per case of `cases`: accuracy, median seconds, state bytes and saved bytes."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}.")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(CASES)}.")
    config = TrainConfig(epochs=epochs, seed=seed)
    times: dict[str, list[float]] = {name: [] for name in cases}
    result: dict[str, dict[str, Any]] = {}
    for r in range(repeats + 1):  # round 0 warms up (first-call kernel setup)
        for name in cases:
            precision, mode = CASES[name]
            probe = _MemoryProbe()
            run, _ = train_digits(precision, replace(config, mode=mode), callbacks=[probe])
            if r:
                times[name].append(run.seconds)
            result[name] = {
                "precision": precision,
                "mode": run.mode,
                "accuracy": run.accuracy,
                "skipped_steps": run.skipped_steps,
                "state_bytes": probe.state_bytes,
                "saved_bytes": probe.saved_bytes,
            }
    for name, t in times.items():
        result[name]["seconds"] = round(statistics.median(t), 3)
    return {"epochs": epochs, "repeats": repeats, "cases": result}


def format_report(result: dict[str, Any]) -> str:
    """The cases as a table, bytes also relative to fp32."""
    cases = result["cases"]
    base = cases.get("fp32")

    def vs_fp32(c: dict[str, Any], key: str) -> float | None:
        return None if base is None else c[key] / base[key]

    rows = [
        [
            name,
            f"{c['accuracy']:.4f}",
            c["seconds"],
            c["skipped_steps"],
            c["state_bytes"],
            vs_fp32(c, "state_bytes"),
            c["saved_bytes"],
            vs_fp32(c, "saved_bytes"),
        ]
        for name, c in cases.items()
    ]
    table = format_table(
        ["case", "accuracy", "seconds", "skipped", "state B", "vs fp32", "saved B", "vs fp32"],
        rows,
    )
    return (
        f"digits CNN, {result['epochs']} epochs, median of {result['repeats']} fits "
        f"({describe_machine()})\n{table}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench modes`."""
    parser.add_argument("--epochs", type=positive_int, default=8, help="epochs per fit")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed fits per case")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed")
    parser.add_argument(
        "--cases",
        type=comma_list(list(CASES)),
        default=",".join(CASES),
        help=f"comma-separated, from {', '.join(CASES)}",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success."""
    apply_threads(args.threads)
    result = measure(args.epochs, args.repeats, args.seed, args.cases)
    print_result(format_report(result), result, args.json)
    return 0
