"""Which model parameters each optimizer param group holds, by name, and a saved optimizer
state moved from one such layout to another.

A Learner whose model grew between fits holds the new parameters in param groups added at
the end (`Learner.add_new_params`); a Learner built on the grown model holds them in the
layer groups' own param groups. Its checkpoint records the layout, so that either loads into
the other: the saved state is regrouped by parameter name before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mixprec.core.master import flatten_like, master_views

__all__ = ["group_names", "layer_group_names", "regroup_state_dict"]

Layout = list[list[str]]


def group_names(model: nn.Module, opt: torch.optim.Optimizer) -> Layout:
    """Per param group of `opt`, the names in `model` of the model parameters it steps (a
    mixprec wrapper's model parameters, not its masters), in order."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = getattr(opt, "model_params", None)
    if groups is None:
        groups = [g["params"] for g in opt.param_groups]
    return [[names.get(id(p), "?") for p in group] for group in groups]


def layer_group_names(model: nn.Module, param_groups: Sequence[Mapping[str, Any]]) -> Layout:
    """Per param group the layer groups give (`Learner.param_groups()`), its parameters'
    names in `model`: the layout of an optimizer built on the model as it is."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in param_groups]


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and bool(torch.equal(a.cpu(), b.cpu()))
    return bool(a == b)


def _agreed(values: Sequence[Mapping[str, Any]], what: str, name: str) -> dict[str, Any]:
    """The one mapping all `values` agree on; a ValueError naming the first key they do not."""
    first = dict(values[0])
    for other in values[1:]:
        for key in sorted(set(first) | set(other)):
            if key not in first or key not in other or not _same(first[key], other[key]):
                raise ValueError(
                    f"the saved optimizer holds the parameters of this learner's param group "
                    f"of {name} in several groups whose {what} {key!r} differs, so they cannot "
                    "be joined into one. Load it into a learner whose optimizer has the saved "
                    "layout: build the learner (and call to_fp16) on the model as it was "
                    "first, replace the same modules as the saving run did, then load."
                )
    return first


def regroup_state_dict(
    saved: Mapping[str, Any],
    saved_layout: Layout,
    layout: Layout,
    params: Mapping[str, torch.Tensor],
    flat: bool,
) -> dict[str, Any]:
    """A torch optimizer `state_dict` saved with the param groups `saved_layout` (names per
    group), laid out for `layout` instead: per-parameter state follows each name, and the
    groups' hyper-parameters come from the saved groups holding its parameters (which must
    agree). With `flat` masters (one state per group, `params` giving each name's shape and
    memory format) per-element state is cut per parameter and joined again, and per-tensor
    entries (a step count) must agree. Refuses with a ValueError; changes nothing."""
    groups = saved["param_groups"]
    where = {name: i for i, names in enumerate(saved_layout) for name in names}
    state = saved.get("state", {})
    per_name: dict[str, dict[str, Any]] = {}  # a parameter's state (flat: its slices)
    scalars: dict[str, dict[str, Any]] = {}  # flat: its group's per-tensor entries
    for names, group in zip(saved_layout, groups):
        if not flat:
            per_name.update({n: state[i] for n, i in zip(names, group["params"]) if i in state})
            continue
        entry = state.get(group["params"][0], {}) if group["params"] else {}
        like = [params[n] for n in names]
        total = sum(p.numel() for p in like)
        moments = {k for k, v in entry.items() if torch.is_tensor(v) and v.shape == (total,)}
        cut = {k: master_views(like, [entry[k]], True) for k in moments}
        for j, n in enumerate(names):
            per_name[n] = {k: views[j] for k, views in cut.items()}
            scalars[n] = {k: v for k, v in entry.items() if k not in moments}
    new_groups, new_state = [], {}
    index = 0
    for names in layout:
        sources = sorted({where[n] for n in names}) or [min(len(new_groups), len(groups) - 1)]
        label = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        hyper = _agreed(
            [{k: v for k, v in groups[i].items() if k != "params"} for i in sources],
            "hyper-parameter",
            label or "no parameters",
        )
        if not flat:
            new_state.update({index + j: per_name[n] for j, n in enumerate(names) if n in per_name})
            new_groups.append({**hyper, "params": list(range(index, index + len(names)))})
            index += len(names)
            continue
        if not names:
            new_groups.append({**hyper, "params": []})
            continue
        if len({frozenset(per_name[n]) for n in names}) > 1:
            raise ValueError(
                f"the saved optimizer holds state for some parameters of this learner's flat "
                f"param group of {label} and not for others; one flat master needs it for all."
            )
        if any(per_name[n] or scalars[n] for n in names):
            joined = _agreed([scalars[n] for n in names], "per-group state", label)
            like = [params[n] for n in names]
            for k in per_name[names[0]]:
                joined[k] = flatten_like([per_name[n][k] for n in names], like, like[0].device)
            new_state[index] = joined
        new_groups.append({**hyper, "params": [index]})
        index += 1
    return {**saved, "state": new_state, "param_groups": new_groups}
