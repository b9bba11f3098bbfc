"""The histogram plot of a `GradientRange` (matplotlib, imported only here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .gradient_range import EXPONENTS, FORMATS

if TYPE_CHECKING:
    from .gradient_range import GradientRange

__all__ = ["plot_gradient_range"]


def plot_gradient_range(result: GradientRange, path: Path, title: str | None = None) -> Path:
    """Plot log2 |gradient| of weights and activations against the fp16/bf16 ranges to `path`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    fp16, bf16 = FORMATS["fp16"], FORMATS["bf16"]
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    lows, highs = [fp16.flush_exp - 2], [fp16.overflow_exp + 2]
    for kind, color in (("weights", "tab:blue"), ("activations", "tab:orange")):
        h = result.histogram(kind)
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
        fp16.flush_exp + 1, fp16.normal_min_exp, color="gold", alpha=0.15, label="fp16 subnormal"
    )
    ax.axvspan(fp16.overflow_exp, x_hi, color="purple", alpha=0.12, label="fp16: overflows")
    for exp, text in ((bf16.flush_exp + 1, "bf16 flush"), (bf16.overflow_exp, "bf16 max")):
        if x_lo <= exp <= x_hi:
            ax.axvline(exp, color="gray", linestyle="--", linewidth=1, label=text)
    ax.set_xlim(x_lo, x_hi)
    ax.set_xlabel("log2 |gradient| (bin e holds 2^e <= |g| < 2^(e+1))")
    ax.set_ylabel("% of non-zero values")
    rng = result.scale_range("fp16")
    scale_text = (
        "no single fp16 loss scale fits"
        if rng is None
        else f"fp16 loss scales 2^{int(math.log2(rng[0]))}..2^{int(math.log2(rng[1]))} fit"
    )
    shares = result.shares("all", "fp16")
    ax.set_title(
        title
        or f"Gradients at scale 1: {100 * shares['underflow']:.1f}% flush to zero in fp16, "
        f"{100 * shares['overflow']:.2f}% overflow; {scale_text}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_ylim(0, max(1.0, float(np.max(ax.get_ylim()))))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
