"""Optimizer state onto fp32 masters, and saved masters checked against the live ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mixprec.core.master import ParamGroups, flatten_like, shapes_summary
from mixprec.core.modes import check_saved_mode

__all__ = ["check_saved_masters", "move_state_to_masters"]


def _merged_state(state: dict, params: Sequence[torch.Tensor], master: torch.Tensor) -> dict:
    """One flat master's optimizer state from its parameters' states: per-element entries
    concatenated in fp32, per-tensor ones (e.g. Adam's step) kept if every parameter agrees."""
    states = [state.get(p, {}) for p in params]
    if not any(states):
        return {}
    keys = set(states[0])
    merged: dict[str, Any] = {}
    for key in sorted(keys) if all(set(st) == keys for st in states) else []:
        values = [st[key] for st in states]
        if all(
            torch.is_tensor(v) and v.dim() and v.shape == p.shape for v, p in zip(values, params)
        ):
            merged[key] = flatten_like(values, params, master.device)
        elif all(_same_value(v, values[0]) for v in values):
            merged[key] = values[0].clone() if torch.is_tensor(values[0]) else values[0]
    if len(merged) != len(keys) or not all(states):
        raise ValueError(
            "the optimizer holds per-parameter state that cannot be merged into one flat "
            "master per group (some parameters have no state, or per-tensor entries such as "
            "step counts differ); wrap the optimizer before its first step or use "
            "flat_master=False."
        )
    return merged


def _same_value(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def move_state_to_masters(
    state: dict, model_params: ParamGroups, master_params: ParamGroups, flat_master: bool
) -> None:
    """Re-key optimizer `state` from steps taken on the half model to the fp32 masters."""
    if not any(p in state for group in model_params for p in group):
        return
    if flat_master:
        pairs = [(ps, ms[0]) for ps, ms in zip(model_params, master_params) if ps]
        merged = [
            _merged_state(state, ps, m) for ps, m in pairs
        ]  # all first: a refusal changes nothing
        for (ps, m), st in zip(pairs, merged):
            for p in ps:
                state.pop(p, None)
            if st:
                state[m] = st
        return
    for model_group, master_group in zip(model_params, master_params):
        for p, m in zip(model_group, master_group):
            if p in state:
                state[m] = {
                    k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v
                    for k, v in state.pop(p).items()
                }


def check_saved_masters(
    state_dict: Mapping[str, Any], master_params: ParamGroups, flat_master: bool
) -> ParamGroups:
    """Return the masters of a MixedPrecisionOptimizer `state_dict` if they fit `master_params`;
    raise ValueError naming the mismatch otherwise."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "expected a MixedPrecisionOptimizer state_dict (from opt.state_dict()); got "
            f"{type(state_dict).__name__}."
        )
    check_saved_mode(state_dict, "master")
    missing = {"masters", "optimizer", "scaler"} - set(state_dict)
    if missing:
        raise ValueError(
            f"not a MixedPrecisionOptimizer state_dict: missing {sorted(missing)}; got keys "
            f"{sorted(state_dict)}."
        )
    flat = bool(state_dict.get("flat_master", flat_master))
    if flat != flat_master:
        raise ValueError(
            f"state_dict was saved with flat_master={flat} but this optimizer has "
            f"flat_master={flat_master}; build it with the same flat_master."
        )
    saved = state_dict["masters"]
    if not isinstance(saved, Sequence) or not all(
        isinstance(group, Sequence) and all(torch.is_tensor(m) for m in group) for group in saved
    ):
        raise ValueError("state_dict['masters'] must be lists of tensors, one list per group.")
    wrong = sorted({str(m.dtype) for group in saved for m in group if m.dtype != torch.float32})
    if wrong:
        raise ValueError(f"state_dict holds masters of dtype {', '.join(wrong)}; expected fp32.")
    expected = [[tuple(m.shape) for m in group] for group in master_params]
    got = [[tuple(m.shape) for m in group] for group in saved]
    if expected != got:
        raise ValueError(
            "state_dict holds masters of another model: expected shapes per group "
            f"{shapes_summary(expected)}, got {shapes_summary(got)}."
        )
    return saved
