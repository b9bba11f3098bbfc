"""The two precision modes, their names, and the checks that keep them apart.

- "master" (the documented default): the model is converted to fp16/bf16 (norm layers kept
  fp32) and the optimizer steps fp32 master copies of its weights (`MixedPrecisionOptimizer`).
- "autocast": the model stays fp32 and its forward and loss run under `torch.autocast`, which
  runs each op in half precision where torch deems it safe; the gradients and the optimizer
  are fp32, with no masters (`AutocastOptimizer`).

Both scale the loss with the same `LossScaler`, and their optimizers share one interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["MODES", "Mode", "check_mode", "check_mode_options", "check_saved_mode", "saved_mode"]

Mode = Literal["master", "autocast"]

MODES: dict[str, str] = {
    "master": "a half model stepping fp32 master weights",
    "autocast": "an fp32 model under torch.autocast, no masters",
}
"""Each mode and what it trains."""


def _names() -> str:
    return ", ".join(repr(m) for m in MODES)


def check_mode(mode: Any) -> Mode:
    """Return `mode` if it names a mode, else raise a TypeError/ValueError listing them."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, one of {_names()}; got {mode!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {_names()}; got {mode!r}.")
    return mode  # type: ignore[return-value]


def check_mode_options(
    mode: Mode, call: str = "MixedPrecision", show_mode: bool = True, **options: Any
) -> None:
    """Reject options that contradict `mode`, echoing the call (`call`, with `mode=` if
    `show_mode`): under "autocast" there are no masters to lay flat (`flat_master`)."""
    if mode != "autocast" or not options.get("flat_master"):
        return
    args = (
        f"mode='autocast', flat_master={options['flat_master']!r}"
        if show_mode
        else f"flat_master={options['flat_master']!r}"
    )
    raise ValueError(
        f"{call}({args}): flat_master lays out the fp32 master weights, which "
        "mode='autocast' does not keep (the model itself stays fp32). Drop flat_master, or "
        "use mode='master'."
    )


def saved_mode(state_dict: Mapping[str, Any]) -> str | None:
    """The mode an optimizer `state_dict` was saved in ("master" for one holding masters,
    which older versions saved without a mode); None if it does not say."""
    if "mode" in state_dict:
        return str(state_dict["mode"])
    return "master" if "masters" in state_dict else None


def check_saved_mode(state_dict: Mapping[str, Any], mode: Mode) -> None:
    """Raise ValueError if the optimizer `state_dict` was saved in a mode other than `mode`."""
    saved = saved_mode(state_dict)
    if saved is None or saved == mode:
        return
    raise ValueError(
        f"this state was saved in mode={saved!r} ({MODES.get(saved, 'unknown')}) but is being "
        f"loaded in mode={mode!r} ({MODES[mode]}). Load it in mode={saved!r}; to change modes, "
        f"load it there, call learn.to_fp32() (the fp32 weights and the optimizer state carry "
        f"over), then learn.to_fp16(mode={mode!r})."
    )
