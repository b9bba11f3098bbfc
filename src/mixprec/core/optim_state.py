"""A torch optimizer's `state_dict` checked against the optimizer it is loaded into, before
anything loads, and per-parameter state left half-made by an interrupted step removed.

`torch.optim.Optimizer.load_state_dict` checks only the number of parameters per group: a
state saved by SGD loads into AdamW (whose next step fails with `KeyError: 'step'`), AdamW's
into SGD (`KeyError: 'momentum'` later). Here everything the next step will use is checked:
the optimizer type (when the state says it), the number of param groups and their sizes, the
hyper-parameter keys of each group (the optimizer's own: the keys an lr scheduler adds are not
asked of a state saved without one), and per parameter the state keys the optimizer needs and
the shapes of its per-element tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "REQUIRED_STATE",
    "check_held",
    "check_optimizer_state_dict",
    "drop_incomplete_state_",
    "hyper_parameter_keys",
    "load_optimizer_state_dict",
    "optimizer_type_name",
    "remove_params_",
]

REQUIRED_STATE: dict[str, frozenset[str]] = {
    "Adam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "AdamW": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "RAdam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "NAdam": frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    "Adamax": frozenset({"step", "exp_avg", "exp_inf"}),
    "SGD": frozenset({"momentum_buffer"}),
    "RMSprop": frozenset({"step", "square_avg"}),
    "Adagrad": frozenset({"step", "sum"}),
    "Adadelta": frozenset({"step", "square_avg", "acc_delta"}),
    "Rprop": frozenset({"step", "prev", "step_size"}),
}
"""Per torch optimizer (exact type name), the state keys each stepped parameter holds."""

SHOWN = 4


def optimizer_type_name(optimizer: torch.optim.Optimizer) -> str:
    """`optimizer`'s class as `module.Name` (what a state_dict records as its type)."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _required(optimizer: torch.optim.Optimizer) -> frozenset[str] | None:
    cls = type(optimizer)
    if cls.__module__.startswith("torch.optim"):
        return REQUIRED_STATE.get(cls.__name__)
    return None


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(map(str, items[:SHOWN]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > SHOWN else "")


def _group_keys_after_load(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> set:
    """The keys a saved param group has once loaded: the optimizer's `__setstate__` fills the
    defaults of keys newer torch versions added (run on a bare instance, params left out)."""
    probe = {k: v for k, v in group.items() if k != "params"}
    probe["params"] = []
    shadow = type(optimizer).__new__(type(optimizer))
    try:
        shadow.__setstate__(
            {"defaults": dict(optimizer.defaults), "state": {}, "param_groups": [probe]}
        )
        return set(shadow.param_groups[0])
    except Exception:  # an optimizer whose __setstate__ needs more: the keys as saved
        return set(group)


def hyper_parameter_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    """The optimizer's own hyper-parameter keys (those of its `defaults`). The other keys of
    its param groups were put there by someone else, such as an lr scheduler (`initial_lr`,
    `max_lr`, `base_momentum`, ...): a state saved without them still belongs to this type."""
    return set(optimizer.defaults) - {"params", "param_names"}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: Any) -> None:
    """`optimizer.load_state_dict(state_dict)`, keeping the param-group keys that are not
    hyper-parameters (a scheduler's, built on this optimizer) where the saved groups lack
    them: torch would drop them, and the scheduler's next step would fail on them."""
    hyper = hyper_parameter_keys(optimizer) | {"params", "param_names"}
    own = [{k: v for k, v in g.items() if k not in hyper} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, extra in zip(optimizer.param_groups, own):
        for key, value in extra.items():
            group.setdefault(key, value)


def _guess(keys: set[str]) -> str:
    names = [n for n, req in REQUIRED_STATE.items() if req == keys]
    return f" (as {' or '.join(names)} keeps)" if names else ""


def check_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: Any,
    params: Sequence[Sequence[torch.Tensor]] | None = None,
    saved_type: str | None = None,
) -> None:
    """Raise a ValueError naming what differs if `optimizer.load_state_dict(state_dict)`
    would fail, or load a state its next step cannot use. `params` are the tensors the
    loaded state will belong to, per group (default: the optimizer's own); `saved_type` the
    optimizer type recorded beside the state, if any."""
    ours = optimizer_type_name(optimizer)
    if saved_type is not None and saved_type != ours:
        raise ValueError(
            f"the state was saved by a {saved_type} but is being loaded into a {ours}: build "
            "the optimizer with the same type (opt_func) as the one that saved it."
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"expected an optimizer state_dict (a mapping with 'state' and 'param_groups'); "
            f"got {type(state_dict).__name__}."
        )
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(
            f"not an optimizer state_dict: missing {missing}; got keys {sorted(state_dict)}."
        )
    groups = state_dict["param_groups"]
    state = state_dict["state"]
    if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError("the optimizer state_dict's 'param_groups' is not a list of dicts.")
    if not isinstance(state, Mapping):
        raise ValueError("the optimizer state_dict's 'state' is not a dict.")
    params = [list(g["params"]) for g in optimizer.param_groups] if params is None else params
    got = [len(g.get("params", ())) for g in groups]
    expected = [len(g) for g in params]
    if got != expected:
        raise ValueError(
            f"the saved optimizer has parameters per group {got}, but this one has {expected}: "
            "it was saved with other layer groups, opt_func or model. Build the optimizer as "
            "the one that saved it."
        )
    hyper = hyper_parameter_keys(optimizer)
    for i, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        lacking = sorted((hyper & set(current)) - _group_keys_after_load(optimizer, saved))
        if lacking:
            raise ValueError(
                f"param group {i} of the saved optimizer has no {_listed(lacking)}, which "
                f"this {type(optimizer).__name__} needs: it was saved by another optimizer "
                "type. Build the optimizer with the same opt_func as the one that saved it."
            )
    by_index: dict[Any, torch.Tensor] = {}
    for saved, current in zip(groups, params):
        by_index.update(zip(saved.get("params", ()), current))
    required = _required(optimizer)
    for index, entry in state.items():
        if index not in by_index:
            raise ValueError(
                f"the saved optimizer holds state for parameter {index!r}, which none of its "
                "param groups lists: the state_dict is damaged."
            )
        if not isinstance(entry, Mapping):
            raise ValueError(f"the saved state of parameter {index!r} is not a dict.")
        if required is not None and entry and not required <= set(entry):
            raise ValueError(
                f"the saved state of parameter {index} holds {sorted(entry)}{_guess(set(entry))}, "
                f"but a {type(optimizer).__name__} needs {sorted(required)}: it was saved by "
                "another optimizer type. Build the optimizer with the same opt_func as the one "
                "that saved it."
            )
        p = by_index[index]
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                raise ValueError(
                    f"the saved state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, but the parameter has {tuple(p.shape)}: it was "
                    "saved for another model or layout."
                )


def drop_incomplete_state_(optimizer: torch.optim.Optimizer) -> int:
    """Remove the per-parameter state entries that lack keys the optimizer's step creates
    together (left by a step interrupted while making them); return how many were removed.
    The optimizer then creates them afresh, as on a first step."""
    state = optimizer.state
    entries = [(p, st) for p, st in state.items() if isinstance(st, Mapping)]
    if not entries:
        return 0
    required = _required(optimizer)
    if required is None:
        required = frozenset().union(*(set(st) for _, st in entries))
    broken = [p for p, st in entries if st and not required <= set(st)]
    broken += [p for p, st in entries if not st]
    for p in broken:
        state.pop(p, None)
    return len(broken)


def remove_params_(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Take `params` out of `optimizer`'s param groups (emptied groups stay, as torch keeps
    them) and drop their per-parameter state; a ValueError, before anything changes, if one
    of them is not in a group."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    check_held(held, params)
    drop = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in drop]
    for p in params:
        optimizer.state.pop(p, None)


def check_held(held: set[int], params: Sequence[torch.Tensor]) -> None:
    """Raise a TypeError unless `params` are tensors, a ValueError unless each one's id is in
    `held` (the parameters an optimizer steps)."""
    wrong = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)]
    if wrong:
        raise TypeError(f"params must be tensors (parameters); got {_listed(wrong)}.")
    foreign = [tuple(p.shape) for p in params if id(p) not in held]
    if foreign:
        raise ValueError(
            f"{len(foreign)} of the tensors to remove (shapes {_listed(foreign)}) are not "
            "held by the optimizer; pass only parameters it steps."
        )
