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

import torch

__all__ = ["MAX_REMAINDER", "join", "join_", "split", "split_"]

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


def join_(out: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Write the fp32 masters that `high` (bf16) and `low` (int16) encode into `out`."""
    _check(high, low, out)
    bits = out.view(torch.int32)
    bits.copy_(high.view(torch.int16))  # sign-extended
    bits.mul_(1 << 16)  # modulo 2**32, as the encoding is
    bits.add_(low)
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
    (see the module docstring). No host sync.
    """
    _check(high, low, master)
    high.copy_(master)  # round to nearest, ties to even
    d = torch.empty_like(master, dtype=torch.int32) if work is None else work.view(torch.int32)
    d.copy_(high.view(torch.int16))  # sign-extended
    d.mul_(-(1 << 16))  # -bits(high) * 2**16, modulo 2**32
    d.add_(master.view(torch.int32))
    if ties is not None:
        ties.add_((d > MAX_REMAINDER).sum())
    d.clamp_max_(MAX_REMAINDER)  # the upper tie of an even high (and nan) leave the range
    low.copy_(d)  # a nan's remainder may also lie below it: any int16 keeps a nan a nan


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): new bf16 and int16 tensors storing fp32 `master` (see `split_`)."""
    high = torch.empty_like(master, dtype=torch.bfloat16)
    low = torch.empty_like(master, dtype=torch.int16)
    split_(master, high, low)
    return high, low


def join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor holding the masters `high` and `low` encode."""
    return join_(torch.empty_like(high, dtype=torch.float32), high, low)
