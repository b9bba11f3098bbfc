"""Histograms of log2 |gradient| and where they fall against the fp16 and bf16 ranges.

A gradient `g` is binned by its binary exponent `floor(log2 |g|)`, so multiplying by a
power-of-two loss scale `2**k` shifts every bin by `k` exactly: one histogram answers "what
would underflow or overflow at scale `2**k`" for every `k`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mixprec.core.figures import save_figure

__all__ = [
    "FORMATS",
    "FloatFormat",
    "GradientHistogram",
    "GradientRange",
    "Kind",
]

Kind = Literal["weights", "activations", "all"]
KINDS: tuple[str, ...] = ("weights", "activations", "all")

# Bins cover every finite non-zero fp32 exponent: 2**-149 (smallest subnormal) .. 2**127.
_MIN_EXP = -149
_MAX_EXP = 127
_N_BINS = _MAX_EXP - _MIN_EXP + 1
EXPONENTS = np.arange(_MIN_EXP, _MAX_EXP + 1)


@dataclass(frozen=True)
class FloatFormat:
    """The range of a half format, as binary exponents taken from `torch.finfo`."""

    name: str
    dtype: torch.dtype

    @property
    def normal_min_exp(self) -> int:
        """log2 of the smallest normal value (fp16: -14)."""
        return int(math.log2(torch.finfo(self.dtype).smallest_normal))

    @property
    def subnormal_min_exp(self) -> int:
        """log2 of the smallest subnormal value (fp16: -24)."""
        return self.normal_min_exp - int(-math.log2(torch.finfo(self.dtype).eps))

    @property
    def max_value(self) -> float:
        """The largest finite value (fp16: 65504)."""
        return float(torch.finfo(self.dtype).max)

    @property
    def overflow_exp(self) -> int:
        """Values with binary exponent >= this overflow (fp16: 16, i.e. |x| >= 2**16).

        The last octave is counted as fitting, so the few values in [65520, 65536) that fp16
        rounds to inf are missed (they are 1/4096 of that octave).
        """
        return math.floor(math.log2(self.max_value)) + 1

    @property
    def flush_exp(self) -> int:
        """Values with binary exponent <= this round to zero: below half the smallest subnormal."""
        return self.subnormal_min_exp - 2


FORMATS: dict[str, FloatFormat] = {
    "fp16": FloatFormat("fp16", torch.float16),
    "bf16": FloatFormat("bf16", torch.bfloat16),
}


def _check_format(fmt: str) -> FloatFormat:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}; got {fmt!r}.")
    return FORMATS[fmt]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}; got {kind!r}.")
    return kind


def _log2_scale(scale: float) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive power of two; got {scale!r}.")
    k = math.log2(scale)
    if not k.is_integer():
        raise ValueError(
            f"scale must be a power of two (the histogram is binned by binary exponent); got "
            f"{scale!r}. Try 2.0**{round(k)}."
        )
    return int(k)


@dataclass
class GradientHistogram:
    """Counts of gradient values by binary exponent, plus exact zeros and inf/nan."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(_N_BINS, dtype=np.int64))
    zeros: int = 0
    nonfinite: int = 0

    def add_(self, grad: torch.Tensor) -> GradientHistogram:
        """Count the values of `grad` (any float dtype, any device); returns self."""
        g = grad.detach().reshape(-1).float()
        finite = torch.isfinite(g)
        nonzero = finite & (g != 0)
        _, exponent = torch.frexp(g[nonzero])  # g = m * 2**e with 0.5 <= |m| < 1
        bins = (exponent.long() - 1 - _MIN_EXP).clamp_(0, _N_BINS - 1)
        self.counts += torch.bincount(bins, minlength=_N_BINS).cpu().numpy()
        n_finite, n_nonzero = int(finite.sum()), int(nonzero.sum())
        self.nonfinite += g.numel() - n_finite
        self.zeros += n_finite - n_nonzero
        return self

    def __add__(self, other: GradientHistogram) -> GradientHistogram:
        return GradientHistogram(
            self.counts + other.counts, self.zeros + other.zeros, self.nonfinite + other.nonfinite
        )

    @property
    def nonzero(self) -> int:
        """Finite non-zero values: the ones a format can lose."""
        return int(self.counts.sum())

    @property
    def total(self) -> int:
        return self.nonzero + self.zeros + self.nonfinite

    def shares(self, fmt: str = "fp16", scale: float = 1.0) -> dict[str, float]:
        """Shares of the non-zero values that, times `scale`, flush to zero in `fmt`, land among
        its subnormals (fewer significant bits) or overflow; and the share of exact zeros."""
        f = _check_format(fmt)
        k = _log2_scale(scale)
        e = EXPONENTS + k
        n = max(self.nonzero, 1)
        return {
            "underflow": float(self.counts[e <= f.flush_exp].sum() / n),
            "subnormal": float(self.counts[(e > f.flush_exp) & (e < f.normal_min_exp)].sum() / n),
            "overflow": float(self.counts[e >= f.overflow_exp].sum() / n),
            "zero": self.zeros / max(self.total, 1),
        }

    def exponent_range(self) -> tuple[int, int, int] | None:
        """(lowest, median, highest) binary exponent of the non-zero values; None if none."""
        if self.nonzero == 0:
            return None
        nz = np.flatnonzero(self.counts)
        median = int(np.searchsorted(np.cumsum(self.counts), self.nonzero / 2))
        return int(EXPONENTS[nz[0]]), int(EXPONENTS[median]), int(EXPONENTS[nz[-1]])

    def scale_exponents(
        self, fmt: str, underflow_threshold: float, overflow_threshold: float
    ) -> tuple[int, int] | None:
        """The range [lo, hi] of k such that at scale 2**k both shares stay within their
        thresholds; None when no scale does (the values span more than the format holds)."""
        f = _check_format(fmt)
        n = self.nonzero
        if n == 0:
            return None
        # shift k moves bin e to e + k: underflow(k) = share of e <= flush_exp - k (falls as k
        # grows), overflow(k) = share of e >= overflow_exp - k (rises as k grows).
        below = np.concatenate([[0], np.cumsum(self.counts)]) / n  # below[i]: bins < i
        ks = np.arange(-_N_BINS - 40, _N_BINS + 40)
        under_idx = np.clip(f.flush_exp - ks - _MIN_EXP + 1, 0, _N_BINS)
        over_idx = np.clip(f.overflow_exp - ks - _MIN_EXP, 0, _N_BINS)
        under = below[under_idx]
        over = 1.0 - below[over_idx]
        ok = ks[(under <= underflow_threshold) & (over <= overflow_threshold + 1e-12)]
        if ok.size == 0:
            return None
        return int(ok.min()), int(ok.max())

    def to_dict(self) -> dict[str, Any]:
        """Plain values: {exponent: count} for non-empty bins, zeros, nonfinite."""
        nz = np.flatnonzero(self.counts)
        return {
            "counts": {int(EXPONENTS[i]): int(self.counts[i]) for i in nz},
            "zeros": self.zeros,
            "nonfinite": self.nonfinite,
        }


def _sum(hists: Iterable[GradientHistogram]) -> GradientHistogram:
    total = GradientHistogram()
    for h in hists:
        total = total + h
    return total


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.9995 or x == 1 else f"{100 * x:.3f}%"


@dataclass
class GradientRange:
    """What `mixprec.inspect.diagnose` found: gradient histograms by layer, and what they mean for
    fp16 and bf16. `str(result)` is the text summary; `plot(path)` writes the histogram."""

    weights: dict[str, GradientHistogram]
    activations: dict[str, GradientHistogram]
    loss: float
    underflow_threshold: float = 1e-3
    overflow_threshold: float = 0.0

    def histogram(self, kind: Kind = "all") -> GradientHistogram:
        """All layers' values of one kind (weight grads, activation grads, or both) together."""
        _check_kind(kind)
        parts: list[Mapping[str, GradientHistogram]] = []
        if kind in ("weights", "all"):
            parts.append(self.weights)
        if kind in ("activations", "all"):
            parts.append(self.activations)
        return _sum(h for part in parts for h in part.values())

    def shares(self, kind: Kind = "all", fmt: str = "fp16", scale: float = 1.0) -> dict[str, float]:
        """Shares of non-zero gradient values lost at `scale` in `fmt`; see `GradientHistogram`."""
        return self.histogram(kind).shares(fmt, scale)

    def scale_range(self, fmt: str = "fp16", kind: Kind = "all") -> tuple[float, float] | None:
        """(lowest, highest) power-of-two loss scale keeping the underflow share within
        `underflow_threshold` and the overflow share within `overflow_threshold`; None if none."""
        ks = self.histogram(kind).scale_exponents(
            fmt, self.underflow_threshold, self.overflow_threshold
        )
        return None if ks is None else (2.0 ** ks[0], 2.0 ** ks[1])

    def worst_layers(
        self, fmt: str = "fp16", scale: float = 1.0, n: int = 3
    ) -> list[tuple[str, str, float]]:
        """The `n` layers with the largest share of values flushing to zero: (kind, name, share)."""
        rows = [
            (kind, name, h.shares(fmt, scale)["underflow"])
            for kind, table in (("weights", self.weights), ("activations", self.activations))
            for name, h in table.items()
            if h.nonzero
        ]
        rows = [r for r in rows if r[2] > 0]
        return sorted(rows, key=lambda r: -r[2])[:n]

    def summary(self) -> str:
        """A short text report."""
        lines = [
            f"Gradient range of one fp32 forward+backward (loss {self.loss:.4g}); shares of "
            "non-zero values at loss scale 1:",
            f"{'':<13}{'values':>10}{'zero':>8}{'fp16 flush':>12}{'fp16 subn.':>12}"
            f"{'fp16 ovfl.':>12}{'bf16 flush':>12}{'log2|g| min/median/max':>25}",
        ]
        for kind in KINDS:
            h = self.histogram(kind)  # type: ignore[arg-type]
            fp16, bf16 = h.shares("fp16"), h.shares("bf16")
            rng = h.exponent_range()
            spread = "-" if rng is None else "{} / {} / {}".format(*rng)
            lines.append(
                f"{kind:<13}{h.total:>10,}{_pct(fp16['zero']):>8}{_pct(fp16['underflow']):>12}"
                f"{_pct(fp16['subnormal']):>12}{_pct(fp16['overflow']):>12}"
                f"{_pct(bf16['underflow']):>12}{spread:>25}"
            )
        limits = (
            f"underflow <= {_pct(self.underflow_threshold)} and overflow <= "
            f"{_pct(self.overflow_threshold)}"
        )
        for fmt in FORMATS:
            rng = self.scale_range(fmt)
            if rng is None:
                lines.append(
                    f"{fmt}: no loss scale keeps {limits}: the gradients span more octaves "
                    "than the format holds."
                )
            else:
                lo, hi = (int(math.log2(s)) for s in rng)
                lines.append(f"{fmt}: loss scales 2^{lo} .. 2^{hi} keep {limits}.")
        worst = self.worst_layers()
        if worst:
            lines.append(
                "Most fp16 underflow at scale 1: "
                + ", ".join(f"{name or '(model)'} {kind} {_pct(s)}" for kind, name, s in worst)
            )
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: shares per kind and format, scale ranges, histograms."""
        out: dict[str, Any] = {
            "loss": self.loss,
            "underflow_threshold": self.underflow_threshold,
            "overflow_threshold": self.overflow_threshold,
        }
        for kind in KINDS:
            h = self.histogram(kind)  # type: ignore[arg-type]
            out[kind] = {
                "values": h.total,
                **{fmt: h.shares(fmt) for fmt in FORMATS},
                "histogram": h.to_dict(),
            }
        out["scale_range"] = {fmt: self.scale_range(fmt) for fmt in FORMATS}
        return out

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the log2 |gradient| histogram against the fp16 and bf16 ranges as a PNG."""
        from matplotlib.figure import Figure  # optional dependency; no pyplot global state

        path = Path(path)

        fp16, bf16 = FORMATS["fp16"], FORMATS["bf16"]
        fig = Figure(figsize=(9, 4.5), layout="constrained")
        ax = fig.add_subplot()
        lows, highs = [fp16.flush_exp - 2], [fp16.overflow_exp + 2]
        for kind, color in (("weights", "tab:blue"), ("activations", "tab:orange")):
            h = self.histogram(kind)
            if not h.nonzero:
                continue
            lo, _, hi = h.exponent_range()  # type: ignore[misc]
            lows.append(lo - 1)
            highs.append(hi + 2)
            share = 100 * h.counts / h.nonzero
            ax.step(EXPONENTS, share, where="post", color=color, label=f"{kind} ({h.nonzero:,})")
        x_lo, x_hi = min(lows), max(highs)
        ax.axvspan(x_lo, fp16.flush_exp + 1, color="red", alpha=0.12, label="fp16: flushes to 0")
        ax.axvspan(
            fp16.flush_exp + 1,
            fp16.normal_min_exp,
            color="gold",
            alpha=0.15,
            label="fp16 subnormal",
        )
        ax.axvspan(fp16.overflow_exp, x_hi, color="purple", alpha=0.12, label="fp16: overflows")
        for exp, text in ((bf16.flush_exp + 1, "bf16 flush"), (bf16.overflow_exp, "bf16 max")):
            if x_lo <= exp <= x_hi:
                ax.axvline(exp, color="gray", linestyle="--", linewidth=1, label=text)
        ax.set_xlim(x_lo, x_hi)
        ax.set_xlabel("log2 |gradient| (bin e holds 2^e <= |g| < 2^(e+1))")
        ax.set_ylabel("% of non-zero values")
        rng = self.scale_range("fp16")
        scale_text = (
            "no single fp16 loss scale fits"
            if rng is None
            else f"fp16 loss scales 2^{int(math.log2(rng[0]))}..2^{int(math.log2(rng[1]))} fit"
        )
        shares = self.shares("all", "fp16")
        ax.set_title(
            title
            or f"Gradients at scale 1: {100 * shares['underflow']:.1f}% flush to zero in fp16, "
            f"{100 * shares['overflow']:.2f}% overflow; {scale_text}",
            fontsize=10,
        )
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, max(1.0, float(np.max(ax.get_ylim()))))
        save_figure(fig, path, dpi=110)
        return path
