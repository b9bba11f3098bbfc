"""What every benchmark shares: side-by-side timing, tables and the final JSON line."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mixprec.cli.options import add_threads, pin_threads

__all__ = [
    "Case",
    "add_common_arguments",
    "apply_threads",
    "describe_machine",
    "format_table",
    "print_result",
    "side_by_side",
]

Case = tuple[Callable[[], Any] | None, Callable[[], Any]]
"""(setup, fn): `setup` runs untimed before every timed call of `fn`."""


def side_by_side(
    cases: Mapping[str, Case],
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per call of each case, the cases run in turn in every round so that
    a noisy machine slows them alike; `sync` waits for queued device work (e.g. CUDA), `clock`
    reads seconds (`time.thread_time`: CPU time, blind to the time other processes hold the
    core, not to their share of the memory bandwidth)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, (setup, fn) in cases.items():
            if setup is not None:
                setup()
            sync()
            start = clock()
            fn()
            sync()
            if r >= warmup:
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e-2 and x else f"{x:,.2f}"
        if isinstance(x, int) and not isinstance(x, bool):
            return f"{x:,}"
        return "-" if x is None else str(x)

    cells = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def print_result(text: str, result: Mapping[str, Any], as_json: bool) -> None:
    """Print the human-readable `text`, then with `as_json` the result as one JSON line."""
    print(text)
    if as_json:
        print(json.dumps(result, sort_keys=False))


def describe_machine() -> str:
    """One line naming the torch build, the threads and the device."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {device}"


def add_common_arguments(parser: Any) -> None:
    """--json and --threads, shared by every benchmark."""
    parser.add_argument(
        "--json", action="store_true", help="end with the results as one JSON object"
    )
    add_threads(parser)


def apply_threads(threads: int) -> None:
    """Pin torch's CPU thread count, so the numbers reproduce."""
    pin_threads(threads)


def cuda_missing(device: str, hint: str = "use --device cpu") -> bool:
    """Whether `device` asks for CUDA on a machine without it; if so, says so and the fix."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device: run on a GPU machine, or {hint}.")
        return True
    return False
