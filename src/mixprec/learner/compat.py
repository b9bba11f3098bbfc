"""Whether a Learner checkpoint fits the learner it is loaded into, checked in full before
anything is loaded, so a refused checkpoint leaves the learner exactly as it was.

Loading piece by piece would not: `nn.Module.load_state_dict` copies every matching
tensor before it reports the mismatched ones, and the optimizer, scaler and random state
come after the model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mixprec.core.checkpoint import loader_generators
from mixprec.core.optim_state import check_optimizer_state_dict
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.callback import LearnerLike
from mixprec.learner.opt_layout import group_names, layer_group_names, regroup_state_dict
from mixprec.learner.saved_weights import masters_from_entry

__all__ = ["check_checkpoint_fits", "checkpoint_file_name"]

SHOWN = 4


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > SHOWN else "")


def checkpoint_file_name(name: Any) -> str:
    """`f"{name}.pth"` if `name` is a plain file name (no folder, no `..`, not absolute);
    else a ValueError pointing to `save_checkpoint(path)` / `load_checkpoint(path)`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}.")
    plain = (
        name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and os.path.basename(name) == name
        and not os.path.isabs(name)
    )
    if not plain:
        raise ValueError(
            f"name must be a plain file name, without folders; got {name!r}. learn.save(name) "
            "writes learn.path / learn.model_dir / f'{name}.pth'; to write or read anywhere "
            "else, change learn.path (or model_dir), or use mixprec's save_checkpoint(path) "
            "and load_checkpoint(path) for a path of your own."
        )
    return f"{name}.pth"


def _kind(t: torch.Tensor) -> str:
    return "floating-point" if t.is_floating_point() else str(t.dtype)


def _check_model(saved: Any, model: torch.nn.Module, path: os.PathLike) -> None:
    if not isinstance(saved, Mapping):
        raise ValueError(f"{path} holds no model state dict; got {type(saved).__name__}.")
    ours = model.state_dict()
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    reshaped = [
        f"{k} saved {tuple(saved[k].shape)}, here {tuple(v.shape)}"
        for k, v in ours.items()
        if k in saved and torch.is_tensor(v) and torch.is_tensor(saved[k])
        if saved[k].shape != v.shape
    ]
    rekinded = [
        f"{k} saved {saved[k].dtype}, here {v.dtype}"
        for k, v in ours.items()
        if k in saved and torch.is_tensor(v) and torch.is_tensor(saved[k])
        if saved[k].shape == v.shape and _kind(saved[k]) != _kind(v)
    ]
    rekinded += [
        f"{k} saved as {type(saved[k]).__name__}"
        for k in saved
        if k in ours and torch.is_tensor(ours[k]) and not torch.is_tensor(saved[k])
    ]
    if missing or unexpected or reshaped or rekinded:
        parts = [
            f"{len(found)} {what} ({_listed(found)})"
            for found, what in (
                (missing, "missing key(s)"),
                (unexpected, "unexpected key(s)"),
                (reshaped, "tensor(s) of another shape"),
                (rekinded, "tensor(s) of another kind"),
            )
            if found
        ]
        raise ValueError(
            f"{path} holds the weights of another model: {'; '.join(parts)}. Load it into a "
            "learner built on the same architecture."
        )


def _regrouped(
    checkpoint: Mapping[str, Any],
    saved_opt: Any,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer | None,
    layer_groups: list[list[str]],
    path: os.PathLike,
) -> Any:
    """The saved optimizer state laid out as `opt`'s param groups hold the same parameters,
    when both runs had the same layer groups (`layer_groups`: this learner's, by parameter
    name) and a model changed between fits in one of them laid its optimizer out otherwise;
    as saved otherwise (the checks then name what differs)."""
    saved = checkpoint.get("opt_layout")
    if opt is None or not isinstance(saved, Mapping) or not isinstance(saved_opt, Mapping):
        return saved_opt
    saved_layout = saved.get("groups")
    if not isinstance(saved_layout, list) or saved.get("layer_groups") != layer_groups:
        return saved_opt  # saved with other layer groups: refused by the checks, naming it
    layout = group_names(model, opt)
    same_params = sorted(n for g in layout for n in g) == sorted(n for g in saved_layout for n in g)
    if layout == saved_layout or not same_params:
        return saved_opt
    wrapped = isinstance(opt, (MixedPrecisionOptimizer, AutocastOptimizer))
    inner = saved_opt.get("optimizer") if wrapped else saved_opt
    if not isinstance(inner, Mapping) or len(inner.get("param_groups", ())) != len(saved_layout):
        return saved_opt
    params = dict(model.named_parameters())
    try:
        regrouped = regroup_state_dict(
            inner, saved_layout, layout, params, bool(getattr(opt, "flat_master", False))
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    return {**saved_opt, "optimizer": regrouped} if wrapped else regrouped


def check_checkpoint_fits(
    learn: LearnerLike,
    checkpoint: Mapping[str, Any],
    path: os.PathLike,
    opt: torch.optim.Optimizer | None = None,
) -> Mapping[str, Any] | None:
    """Raise a ValueError naming the first thing in `checkpoint` that `learn` cannot take:
    the precision, the model's keys, shapes and dtypes, the optimizer (mode, flat layout,
    masters, type, groups, hyper-parameter keys, per-parameter state, scaler), the counters,
    the history, the data loader's random generators. `opt` is the optimizer the state will
    load into (default `learn.opt`). Returns the optimizer state to load (under mixed
    precision with the masters rebuilt from the `"model"` entry), None if there is none."""
    mp = learn.mixed_precision
    saved_dtype = checkpoint.get("dtype")  # absent from checkpoints of older versions
    if mp is not None and saved_dtype is not None and saved_dtype != str(mp.dtype):
        raise ValueError(
            f"{path} was saved training in {saved_dtype} but this learner trains in "
            f"{mp.dtype}. Load it with to_fp16(dtype={saved_dtype}); to change precision "
            f"after that, call learn.to_fp32().to_fp16(dtype={mp.dtype})."
        )
    _check_model(checkpoint.get("model"), learn.model, path)
    opt = learn.opt if opt is None else opt
    saved_opt = checkpoint.get("opt")
    if saved_opt is not None:
        layer_groups = layer_group_names(learn.model, learn.param_groups())
        saved_opt = _regrouped(checkpoint, saved_opt, learn.model, opt, layer_groups, path)
        stored_once = isinstance(saved_opt, Mapping) and "masters" not in saved_opt
        if isinstance(opt, MixedPrecisionOptimizer) and stored_once and "optimizer" in saved_opt:
            masters = masters_from_entry(checkpoint["model"], learn.model, opt)  # in "model"
            saved_opt = {**saved_opt, "masters": masters}
        try:
            if isinstance(opt, (MixedPrecisionOptimizer, AutocastOptimizer)):
                opt.check_state_dict(saved_opt)
            else:
                check_optimizer_state_dict(opt, saved_opt, None, checkpoint.get("opt_type"))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
    for key in ("epoch", "iteration"):
        value = checkpoint.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: {key!r} must be an integer >= 0; got {value!r}.")
    try:
        copy.deepcopy(learn.recorder).load_state_dict(checkpoint.get("recorder", {}))
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: its recorder history cannot be loaded ({error}).") from None
    saved_generators = len(checkpoint.get("rng", {}).get("generators", []))
    generators = len(
        loader_generators(learn.data.train_dl.dl)
    )  # the training loader's own generators
    if "rng" in checkpoint and saved_generators != generators:
        raise ValueError(
            f"{path} holds {saved_generators} data-loader generator states but this learner's "
            f"training loader has {generators}; build the DataLoader the same way "
            "(generator= or not) as the run that saved it."
        )
    return saved_opt
