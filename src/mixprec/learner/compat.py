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
from mixprec.core.master import check_saved_masters
from mixprec.core.modes import check_saved_mode
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.callback import LearnerLike

__all__ = ["check_checkpoint_fits"]

SHOWN = 4


def _listed(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > SHOWN else "")


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
    if missing or unexpected or reshaped:
        parts = [
            f"{len(found)} {what} ({_listed(found)})"
            for found, what in (
                (missing, "missing key(s)"),
                (unexpected, "unexpected key(s)"),
                (reshaped, "tensor(s) of another shape"),
            )
            if found
        ]
        raise ValueError(
            f"{path} holds the weights of another model: {'; '.join(parts)}. Load it into a "
            "learner built on the same architecture."
        )


def _check_groups(saved: Any, groups: Sequence[Sequence[Any]], path: os.PathLike) -> None:
    """The saved optimizer's param groups have the sizes of `groups` (what torch checks, but
    before anything is loaded)."""
    saved_groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(saved_groups, list):
        raise ValueError(f"{path} holds no optimizer state dict (no 'param_groups').")
    got = [len(g.get("params", ())) for g in saved_groups]
    expected = [len(g) for g in groups]
    if got != expected:
        raise ValueError(
            f"{path} holds an optimizer with parameters per group {got}, but this learner's "
            f"has {expected}: it was saved with other layer groups, opt_func or model. Build "
            "the learner as the one that saved it."
        )


def check_checkpoint_fits(
    learn: LearnerLike, checkpoint: Mapping[str, Any], path: os.PathLike
) -> None:
    """Raise a ValueError naming the first thing in `checkpoint` that `learn` cannot take:
    the precision, the model's keys and shapes, the masters, the scaler's mode, the
    optimizer's groups, the data loader's random generators."""
    mp = learn.mixed_precision
    saved_dtype = checkpoint.get("dtype")  # absent from checkpoints of older versions
    if mp is not None and saved_dtype is not None and saved_dtype != str(mp.dtype):
        raise ValueError(
            f"{path} was saved training in {saved_dtype} but this learner trains in "
            f"{mp.dtype}. Load it with to_fp16(dtype={saved_dtype}); to change precision "
            f"after that, call learn.to_fp32().to_fp16(dtype={mp.dtype})."
        )
    _check_model(checkpoint.get("model"), learn.model, path)
    saved_opt = checkpoint.get("opt")
    if saved_opt is not None:
        opt = learn.opt
        if isinstance(opt, MixedPrecisionOptimizer):
            if not isinstance(saved_opt, Mapping):
                raise ValueError(f"{path} holds no optimizer state dict.")
            try:
                check_saved_masters(saved_opt, opt.master_params, opt.flat_master)
                copy.deepcopy(opt.scaler).load_state_dict(saved_opt["scaler"])
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
            _check_groups(saved_opt["optimizer"], opt.master_params, path)
        elif isinstance(opt, AutocastOptimizer):
            if not isinstance(saved_opt, Mapping) or "optimizer" not in saved_opt:
                raise ValueError(f"{path} holds no AutocastOptimizer state dict.")
            try:
                check_saved_mode(saved_opt, "autocast")
                copy.deepcopy(opt.scaler).load_state_dict(saved_opt["scaler"])
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
            _check_groups(saved_opt["optimizer"], [g["params"] for g in opt.param_groups], path)
        else:
            groups = [
                g["params"] for g in (learn.param_groups() if opt is None else opt.param_groups)
            ]
            _check_groups(saved_opt, groups, path)
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
