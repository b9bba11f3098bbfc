"""fp32 masters stored as the bf16 model weight plus 16 low bits: 2 bytes a master, not 4.

A bf16 number is the top half of an fp32 bit pattern. The model's weight is the master
rounded to nearest, ties to even (RNE), as the fp32-master path gives it; the rest of the
master is kept as a signed remainder `low = bits(master) - bits(high) * 2**16` in int16,
and `bits(master) = bits(high) * 2**16 + low` rebuilds it (integer arithmetic on the bit
patterns, modulo 2**32).

One master per even high part cannot be stored. Under RNE an even `high` owns the 2**16 + 1
patterns `high * 2**16 + [-2**15, 2**15]`, both ties included, an odd one the 2**16 - 1
patterns `[-2**15 + 1, 2**15 - 1]`, and int16 holds `[-2**15, 2**15 - 1]`: the remainder
`+2**15` (the upper tie of an even `high`) does not fit. No 16-bit code can do better while
`high` stays RNE(master): 2**16 codes for 2**16 + 1 masters. Such a master is stored one fp32
ulp towards `high` (remainder `2**15 - 1`), which still rounds to the same `high`, so the
model's weight stays exactly RNE of the true master; the step that produced it is the only
one whose master differs from the fp32 path's, by one fp32 ulp (about 2**-24 relative). For
masters spread evenly over their rounding intervals, that is one element-step in 2**17;
`split_` counts them when given a counter.

inf and -inf are stored exactly (remainder 0), so is every finite value, ±0 and subnormals
included; a nan master comes back as a nan (possibly another payload): torch rounds a nan to
a quiet bf16 nan, whose top mantissa bit no int16 remainder can borrow away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixprec.core import native

__all__ = ["MAX_REMAINDER", "Span", "join", "join_", "join_all_", "split", "split_", "split_all_"]

MAX_REMAINDER = (1 << 15) - 1
"""The largest remainder int16 holds (the upper tie of an even high part is one more)."""


def _check(high: torch.Tensor, low: torch.Tensor, master: torch.Tensor) -> None:
    if high.dtype != torch.bfloat16 or low.dtype != torch.int16 or master.dtype != torch.float32:
        raise TypeError(
            "split masters are (bfloat16 high, int16 low) halves of a float32 master; got "
            f"high {high.dtype}, low {low.dtype}, master {master.dtype}."
        )
    if not (high.shape == low.shape == master.shape):
        raise ValueError(
            f"high, low and master must have one shape; got {tuple(high.shape)}, "
            f"{tuple(low.shape)}, {tuple(master.shape)}."
        )


Span = tuple[torch.Tensor, torch.Tensor]
"""(int32 bits, int32 work): contiguous stretches holding every master's bits and every work
tensor of a list, in one order, so that the arithmetic runs as one pass over each (elements
between the listed tensors ride along unused)."""


def join_all_(
    out: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    lows: Sequence[torch.Tensor],
    works: Sequence[torch.Tensor],
    span: Span | None = None,
) -> None:
    """`join_` over lists, a few kernels for all of them; `works` are int32 scratches of
    the tensors' shapes (the low bits are widened there: an int32 + int16 add is several
    times slower than int32 + int32)."""
    # a bf16 number widened to fp32 is its bits * 2**16, bit for bit (nan payloads too)
    torch._foreach_copy_(out, highs)
    torch._foreach_copy_(works, lows)  # sign-extended
    if span is None:  # modulo 2**32, as the encoding is
        torch._foreach_add_([m.view(torch.int32) for m in out], works)
    else:
        span[0].add_(span[1])


def split_all_(
    masters: Sequence[torch.Tensor],
    highs: Sequence[torch.Tensor],
    lows: Sequence[torch.Tensor],
    works: Sequence[torch.Tensor],
    ties: torch.Tensor | None = None,
    span: Span | None = None,
) -> None:
    """`split_` over lists, a few kernels for all of them; `works` are int32 scratches of
    the tensors' shapes."""
    torch._foreach_copy_(highs, masters)  # round to nearest, ties to even
    # bits(high) * 2**16 as the bits of high widened to fp32, then bits(master) minus it
    torch._foreach_copy_([w.view(torch.float32) for w in works], highs)
    if span is None:  # modulo 2**32
        for m, w in zip(masters, works):
            torch.sub(m.view(torch.int32), w, out=w)
    else:
        torch.sub(span[0], span[1], out=span[1])
    if ties is not None:
        for w in works:
            ties.add_((w > MAX_REMAINDER).sum())
    # the upper tie of an even high (and nan) leave the range; a nan's remainder may also
    # lie below it, and any int16 keeps a nan a nan
    if span is None:
        torch._foreach_clamp_max_(works, MAX_REMAINDER)
    else:
        span[1].clamp_max_(MAX_REMAINDER)
    torch._foreach_copy_(lows, works)


def join_(out: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Write the fp32 masters that `high` (bf16) and `low` (int16) encode into `out`."""
    _check(high, low, out)
    join_all_([out], [high], [low], [torch.empty_like(low, dtype=torch.int32)])
    return out


def split_(
    master: torch.Tensor,
    high: torch.Tensor,
    low: torch.Tensor,
    work: torch.Tensor | None = None,
    ties: torch.Tensor | None = None,
) -> None:
    """Store fp32 `master` as `high` = RNE(master) in bf16 and its int16 remainder `low`.

    `work` is an int32 (or fp32) scratch of the same shape (allocated if None); `ties`, a
    0-dim int64 tensor, is increased by the number of masters stored one ulp towards `high`
    (see the module docstring). No host sync. On CPU, one pass of mixprec's native kernel
    when it is built (`mixprec.core.native`) and ties are not counted.
    """
    _check(high, low, master)
    parts = (master, high, low)
    lib = native.library() if ties is None else None
    if lib is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in parts):
        lib.mixprec_split(master.data_ptr(), high.data_ptr(), low.data_ptr(), master.numel())
        return
    d = torch.empty_like(master, dtype=torch.int32) if work is None else work.view(torch.int32)
    split_all_([master], [high], [low], [d], ties)


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): new bf16 and int16 tensors storing fp32 `master` (see `split_`)."""
    high = torch.empty_like(master, dtype=torch.bfloat16)
    low = torch.empty_like(master, dtype=torch.int16)
    split_(master, high, low)
    return high, low


def join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor holding the masters `high` and `low` encode."""
    return join_(torch.empty_like(high, dtype=torch.float32), high, low)
