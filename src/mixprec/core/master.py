"""fp32 master copies of a half model's parameters, and the copies between the two.

These are the documented fastai v1 primitives (`get_master`, `model_g2master_g`,
`master2model`) and the layouts around them (`mixprec.core.flat_group` lays a group's
model parameters out in contiguous buffers; `mixprec.core.master_state` moves optimizer
state onto masters and checks saved ones).

In a flat buffer (a flat master, its gradient, a FlatGroup's half buffers) each parameter
takes `numel()` consecutive elements laid out in the parameter's own memory format: a
channels_last weight keeps its channels_last strides, so the model's view of it is as fast
as before and every copy between buffers stays one 1-D kernel. A contiguous parameter's
elements are in row-major order, as `p.reshape(-1)` gives them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_master_params",
    "flat_views",
    "flatten_like",
    "get_master",
    "load_masters_",
    "make_masters",
    "master2model",
    "master_views",
    "masters_by_param",
    "masters_from_values",
    "model_g2master_g",
    "new_group_params",
    "shapes_summary",
    "trainable_params",
    "unchecked_master2model",
    "unchecked_model_g2master_g",
]

ParamGroups = list[list[torch.Tensor]]


def trainable_params(layer_groups: Iterable[nn.Module | Iterable[torch.Tensor]]) -> ParamGroups:
    """One list per group of its parameters with requires_grad, each tensor once overall.

    A group is a module (its `.parameters()`) or an iterable of parameters; a bare tensor is
    refused (iterating it would yield its rows, which are not parameters)."""
    if isinstance(layer_groups, (torch.Tensor, nn.Module)) and not isinstance(
        layer_groups, (nn.ModuleList, nn.Sequential)
    ):
        raise TypeError(
            "layer_groups must be a collection of nn.Module (one per layer group); got a "
            f"single {type(layer_groups).__name__}. Pass [model] for one group."
        )
    seen: set[int] = set()
    groups = []
    for i, group in enumerate(layer_groups):
        if isinstance(group, torch.Tensor):
            raise TypeError(
                f"layer group {i} is a Tensor (shape {tuple(group.shape)}), not an nn.Module: "
                "get_master takes layer groups of modules, e.g. get_master([model]) or "
                "get_master([nn.ModuleList(blocks), head]), not a list of parameters."
            )
        params = group.parameters() if isinstance(group, nn.Module) else group
        kept = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        groups.append(kept)
    return groups


def _is_dense(t: torch.Tensor) -> bool:
    """Whether `t` covers exactly `numel()` consecutive elements (any dim order, no gaps)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides `t` takes in a flat buffer: its own if dense (keeps channels_last), else
    row-major."""
    if _is_dense(t):
        return tuple(t.stride())
    strides, n = [], 1
    for size in reversed(t.shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def flat_views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the 1-D `flat` shaped like `params`, in order, each in its parameter's memory
    format (see the module docstring)."""
    views, offset = [], 0
    base = flat.storage_offset()
    for p in params:
        views.append(flat.as_strided(p.shape, _layout(p), base + offset))
        offset += p.numel()
    return views


def flatten_like(
    tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor], device
) -> torch.Tensor:
    """One 1-D fp32 tensor holding `tensors` laid out as `flat_views` lays out `like`."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=torch.float32, device=device)
    with torch.no_grad():
        for view, t in zip(flat_views(flat, like), tensors):
            view.copy_(t.detach())
    return flat


_COMPLEX_FIX = (
    "mixprec cannot keep fp32 masters of complex parameters (the overflow check and the flat "
    "buffers are real); store the parameter as a real tensor, nn.Parameter(torch.view_as_real(w)), "
    "and use torch.view_as_complex(self.w) in forward."
)


def check_master_params(model_params: ParamGroups, flat_master: bool) -> None:
    """Raise a TypeError/ValueError if some parameter cannot get an fp32 master: an integer
    or bool one (no gradient, nothing to step), a complex one, or (`flat_master`) a group
    spanning devices."""
    for i, group in enumerate(model_params):
        for j, p in enumerate(group):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"param_groups[{i}][{j}] is a {type(p).__name__}, not a tensor: build the "
                    "optimizer on model.parameters()."
                )
            if p.is_complex():
                raise TypeError(
                    f"param_groups[{i}][{j}] is a complex parameter ({p.dtype}, shape "
                    f"{tuple(p.shape)}). {_COMPLEX_FIX}"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"param_groups[{i}][{j}] is an integer parameter ({p.dtype}, shape "
                    f"{tuple(p.shape)}): it has no gradient and no master can step it (a flat "
                    "master would let weight decay change it). Leave it out of the optimizer: "
                    "torch.optim.AdamW(p for p in model.parameters() if p.is_floating_point())."
                )
        if flat_master:
            devices = {p.device for p in group}
            if len(devices) > 1:
                raise ValueError(
                    "flat_master=True needs every parameter of a layer group on one device; "
                    f"got {sorted(str(d) for d in devices)}. Move the model to one device or "
                    "use flat_master=False."
                )


def _flat_master(params: Sequence[torch.Tensor]) -> nn.Parameter:
    master = nn.Parameter(flatten_like(params, params, params[0].device))
    master.grad = torch.zeros_like(master)
    return master


def make_masters(model_params: ParamGroups, flat_master: bool = False) -> ParamGroups:
    """fp32 copies of `model_params`, per group (one flat fp32 Parameter if `flat_master`),
    each in its parameter's memory format. Given fp32 parameters, the masters are exact."""
    check_master_params(model_params, flat_master)
    if flat_master:
        return [[_flat_master(group)] if group else [] for group in model_params]
    return [
        [
            p.detach()
            .to(torch.float32, memory_format=torch.preserve_format, copy=True)
            .requires_grad_(True)
            for p in group
        ]
        for group in model_params
    ]


def get_master(
    layer_groups: Collection[nn.Module], flat_master: bool = False
) -> tuple[ParamGroups, ParamGroups]:
    """Return `(model_params, master_params)`: per layer group, the trainable parameters and
    their fp32 copies (one flat fp32 Parameter per non-empty group if `flat_master`)."""
    model_params = trainable_params(layer_groups)
    return model_params, make_masters(model_params, flat_master)


def master_views(
    params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor], flat_master: bool
) -> list[torch.Tensor]:
    """Per model parameter of one group, the (detached) master or flat-master view holding
    its fp32 value, shaped and strided like the parameter."""
    if not flat_master:
        return [m.detach() for m in masters]
    return flat_views(masters[0].detach(), params) if params else []


@torch.no_grad()
def load_masters_(
    model_params: ParamGroups,
    master_params: ParamGroups,
    flat_master: bool,
    exact: Mapping[int, torch.Tensor],
) -> None:
    """Copy the fp32 values in `exact` (by model parameter id) into their masters, so masters
    built from a rounded half model start from the exact weights."""
    for params, masters in zip(model_params, master_params):
        for p, view in zip(params, master_views(params, masters, flat_master)):
            if id(p) in exact:
                view.copy_(exact[id(p)])


def masters_from_values(
    model_params: ParamGroups, values: ParamGroups, flat_master: bool
) -> list[list[torch.Tensor]]:
    """Masters laid out as this layout holds them, from each parameter's fp32 value (per
    group, in parameter order): the values themselves, or one flat tensor per non-empty group
    laid out as `flat_views` reads it (memory formats included)."""
    if not flat_master:
        return [[v.detach().to(torch.float32) for v in group] for group in values]
    return [
        [flatten_like(group, params, params[0].device)] if params else []
        for params, group in zip(model_params, values)
    ]


def masters_by_param(
    model_params: ParamGroups, master_params: ParamGroups, flat_master: bool
) -> dict[int, torch.Tensor]:
    """A copy of each model parameter's master value, by parameter id."""
    return {
        id(p): view.clone()
        for params, masters in zip(model_params, master_params)
        for p, view in zip(params, master_views(params, masters, flat_master))
    }


_OTHER_MASTERS = (
    "these masters were made for another model (or before this one changed). Pass the "
    "masters get_master returned for these parameters, or make them anew with get_master."
)


def _check_pairs(model_params: Any, master_params: Any, flat_master: bool) -> None:
    """Raise a ValueError unless the two lists pair up: as many groups, per group as many
    masters as parameters (one flat master per non-empty group), of the same shapes (as many
    elements in a flat master as in its group)."""
    if len(model_params) != len(master_params):
        raise ValueError(
            f"model_params has {len(model_params)} group(s) but master_params has "
            f"{len(master_params)}: pass the two lists get_master returned, together."
        )
    for i, (params, masters) in enumerate(zip(model_params, master_params)):
        expected = (1 if params else 0) if flat_master else len(params)
        if len(masters) != expected:
            raise ValueError(
                f"group {i}: {len(params)} model parameter(s) but {len(masters)} master(s), "
                f"expected {expected} with flat_master={flat_master}: pass the lists "
                "get_master returned, with the same flat_master."
            )
        if flat_master:
            needed = sum(p.numel() for p in params)
            if params and masters[0].numel() != needed:
                shapes = [tuple(p.shape) for p in params]
                raise ValueError(
                    f"group {i}: the flat master has shape {tuple(masters[0].shape)} but the "
                    f"group's parameters, of shapes {shapes_summary([shapes])[1:-1]}, hold "
                    f"{needed} elements: {_OTHER_MASTERS}"
                )
            continue
        if [m.shape for m in masters] == [p.shape for p in params]:
            continue
        for j, (p, m) in enumerate(zip(params, masters)):
            if m.shape != p.shape:
                raise ValueError(
                    f"group {i}, parameter {j}: the master has shape {tuple(m.shape)} but the "
                    f"model parameter has shape {tuple(p.shape)}: {_OTHER_MASTERS}"
                )


def model_g2master_g(
    model_params: ParamGroups,
    master_params: ParamGroups,
    flat_master: bool = False,
    *,
    accumulate: bool = False,
) -> None:
    """Copy (or with `accumulate`, add) the model's gradients into the fp32 master gradients.

    Non-flat: a model gradient that is None leaves its master gradient None. Flat: the flat
    master gradient gets every gradient in order, zeros where a model gradient is None.
    Masters that do not pair up with the parameters (another model's) are refused with a
    ValueError before anything is copied.
    """
    _check_pairs(model_params, master_params, flat_master)
    unchecked_model_g2master_g(model_params, master_params, flat_master, accumulate=accumulate)


def unchecked_model_g2master_g(
    model_params: ParamGroups,
    master_params: ParamGroups,
    flat_master: bool = False,
    *,
    accumulate: bool = False,
) -> None:
    """`model_g2master_g` without its checks, for owners of pairs made by `make_masters`
    (the per-step path, where checking every shape would cost more than the copy)."""
    dst, src = [], []
    with torch.no_grad():
        for model_group, master_group in zip(model_params, master_params):
            if flat_master:
                if not master_group:
                    continue
                (master,) = master_group
                if master.grad is None:
                    master.grad = torch.zeros_like(master)
                for view, p in zip(flat_views(master.grad, model_group), model_group):
                    if p.grad is not None:
                        dst.append(view)
                        src.append(p.grad)
                    elif not accumulate:
                        view.zero_()
                continue
            for master, p in zip(master_group, model_group):
                if p.grad is None:
                    if not accumulate:
                        master.grad = None
                elif master.grad is None:  # a copy, even of an fp32 (norm layer) grad
                    master.grad = p.grad.detach().to(torch.float32, copy=True)
                else:
                    dst.append(master.grad)
                    src.append(p.grad)
        if dst:
            (torch._foreach_add_ if accumulate else torch._foreach_copy_)(dst, src)


def master2model(
    model_params: ParamGroups, master_params: ParamGroups, flat_master: bool = False
) -> None:
    """Copy the master values into the model parameters, rounding to each one's dtype.
    Masters that do not pair up with the parameters (another model's) are refused with a
    ValueError before anything is copied."""
    _check_pairs(model_params, master_params, flat_master)
    unchecked_master2model(model_params, master_params, flat_master)


def unchecked_master2model(
    model_params: ParamGroups, master_params: ParamGroups, flat_master: bool = False
) -> None:
    """`master2model` without its checks, for owners of pairs made by `make_masters`."""
    dst, src = [], []
    for model_group, master_group in zip(model_params, master_params):
        if not model_group:
            continue
        dst.extend(model_group)
        if flat_master:
            src.extend(flat_views(master_group[0].detach(), model_group))
        else:
            src.extend(m.detach() for m in master_group)
    if dst:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)


def shapes_summary(groups: list[list[tuple[int, ...]]], limit: int = 4) -> str:
    """Shapes per group, a few per group, for error messages."""
    parts = []
    for group in groups:
        shown = ", ".join(str(s) for s in group[:limit])
        more = f", ... ({len(group)} tensors)" if len(group) > limit else ""
        parts.append(f"[{shown}{more}]")
    return "[" + ", ".join(parts) + "]"


def new_group_params(params: torch.Tensor | Iterable[torch.Tensor], held: ParamGroups) -> list:
    """The tensors of a new param group's `params`, as a list; ValueError if any of them is
    already in `held` (as torch.optim refuses: it would get a second master)."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    held_ids = {id(p) for group in held for p in group}
    twice = [tuple(p.shape) for p in params if id(p) in held_ids]
    if twice:
        raise ValueError(
            f"some parameters appear in more than one parameter group: {len(twice)} of the new "
            f"group's (shapes {twice[:4]}) are already held. Add only the parameters the "
            "optimizer does not hold yet."
        )
    return params
