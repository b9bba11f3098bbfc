"""`PrecisionConfig`: one validated set of mixed-precision options, for every front end.

`MixedPrecisionOptimizer`, `AutocastOptimizer`, the `MixedPrecision` callback (and so
`Learner.to_fp16`) and the Lightning plugin check their options here, once, before anything
changes: the same values are accepted and refused everywhere, with the same messages.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch

from mixprec.core.checks import check_engine_options, check_flag
from mixprec.core.dtypes import check_half_dtype
from mixprec.core.modes import Mode, check_mode, check_mode_options
from mixprec.core.scaler import LossScale, LossScaler

__all__ = ["MASTER_LAYOUTS", "PrecisionConfig", "scaler_option_names"]

MASTER_LAYOUTS = ("fp32", "split")
"""How masters are kept: fp32 tensors, or bf16 weights plus their 16 low bits."""


def scaler_option_names() -> list[str]:
    """The keyword options of `LossScaler` beyond `loss_scale`."""
    return [n for n in inspect.signature(LossScaler).parameters if n != "loss_scale"]


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """The mixed-precision options of a run, checked at construction (ValueError/TypeError
    naming the option, what it got and what it takes). `call` names the caller in messages."""

    dtype: torch.dtype = torch.float16
    mode: Mode = "master"
    loss_scale: LossScale = "dynamic"
    flat_master: bool = False
    fused: bool | None = None
    master: Literal["fp32", "split"] = "fp32"
    clip: float | None = None
    scaler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    call: str = "MixedPrecision"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        check_flag("flat_master", self.flat_master)
        check_flag("fused", self.fused, none_ok=True)
        check_mode_options(
            self.mode, self.call, show_mode=self.call != "AutocastOptimizer",
            flat_master=self.flat_master, fused=self.fused,
        )  # fmt: skip
        if self.master not in MASTER_LAYOUTS:
            raise ValueError(
                f'{self.call}(master=...) must be "fp32" or "split"; got {self.master!r}.'
            )
        check_half_dtype(self.dtype)
        if self.master == "split" and self.mode != "master":
            raise ValueError(
                f"{self.call}(mode={self.mode!r}, master='split'): split masters are the bf16 "
                "weights of a half model plus 16 low bits; mode='autocast' keeps no masters. "
                "Drop master= or use mode='master'."
            )
        if self.master == "split" and self.dtype != torch.bfloat16:
            raise ValueError(
                f"{self.call}(master='split', dtype={self.dtype}): split masters are bf16 "
                "weights plus 16 low bits. Pass dtype=torch.bfloat16, or master='fp32'."
            )
        known = scaler_option_names()
        unknown = sorted(set(self.scaler_options) - set(known))
        if unknown:
            raise TypeError(
                f"{self.call} got unknown option(s) {', '.join(unknown)}; it takes dtype, clip, "
                f"fused, mode, master, flat_master and the LossScaler options "
                f"{', '.join(known)}."
            )
        self.new_scaler()  # refuses bad scaler values now, not at fit()
        object.__setattr__(self, "clip", check_engine_options(self.clip, True))
        object.__setattr__(self, "scaler_options", dict(self.scaler_options))

    def new_scaler(self) -> LossScaler:
        """A fresh `LossScaler` with these options."""
        return LossScaler(self.loss_scale, **self.scaler_options)
