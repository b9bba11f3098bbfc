"""Gradient accumulation: the micro-batches of a training epoch, grouped into optimizer steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from mixprec.learner.data import loader_length

__all__ = ["MicroBatch", "check_accumulate", "micro_batches", "steps_per_epoch"]


class MicroBatch(NamedTuple):
    """One batch of an epoch: its index, the batch, how many micro-batches its optimizer step
    has (each loss is divided by it) and whether it is the step's last."""

    index: int
    batch: Any
    group_size: int
    ends_step: bool


def check_accumulate(n: Any) -> int:
    """`n` as a number of micro-batches per step (an integer >= 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"accumulate must be an integer >= 1 (micro-batches per optimizer step); got {n!r}."
        )
    return n


def steps_per_epoch(n_batches: int, n: int) -> int:
    """Optimizer steps in an epoch of `n_batches` batches, `n` per step (the last may be short)."""
    return -(-n_batches // n)


def micro_batches(dl: Iterable, n: int) -> Iterator[MicroBatch]:
    """The batches of `dl` in steps of `n`; the epoch's last step takes what is left (fewer).

    With a loader without len() the last batch is found by reading one ahead, and a short last
    step's earlier micro-batches were divided by `n` (its size was not known yet)."""
    length = loader_length(dl)
    if n == 1 or length is not None:  # no read-ahead: batches load when they always did
        for i, batch in enumerate(dl):
            start = i - i % n
            size = n if length is None else max(min(n, length - start), i % n + 1)
            yield MicroBatch(
                i, batch, size, i % n == n - 1 or (length is not None and i + 1 >= length)
            )
        return
    it = iter(dl)
    try:
        current = next(it)
    except StopIteration:
        return
    i = 0
    for following in it:
        yield MicroBatch(i, current, n, i % n == n - 1)
        current, i = following, i + 1
    yield MicroBatch(i, current, n, True)
