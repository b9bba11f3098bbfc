"""A Learner's checkpoint: written whole and atomically, loaded whole after every check."""

from __future__ import annotations

from pathlib import Path

from mixprec.core.checkpoint import load_checkpoint, loader_generators, rng_state, set_rng_state
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.optim_state import optimizer_type_name
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.callback import LearnerLike
from mixprec.learner.compat import check_checkpoint_fits
from mixprec.learner.opt_layout import group_names, layer_group_names
from mixprec.learner.saved_weights import model_entry

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_learner_", "save_learner"]

CHECKPOINT_FORMAT = "mixprec.learner"
CHECKPOINT_VERSION = 2  # 2: the fp32 masters in "model", not a second copy in "opt"


def save_learner(learn: LearnerLike, path: Path) -> Path:
    """Write `learn`'s checkpoint to `path` (rank 0 under torchrun); return `path`."""
    mp = learn.mixed_precision
    if mp is not None:
        mp.prepare()
    opt_state = None if learn.opt is None else learn.opt.state_dict()
    if isinstance(learn.opt, MixedPrecisionOptimizer):
        opt_state = {k: v for k, v in opt_state.items() if k != "masters"}  # in "model"
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "mixed_precision": mp is not None,
        "dtype": None if mp is None else str(mp.dtype),
        "model": model_entry(learn.model, learn.opt),
        "opt": opt_state,
        "opt_layout": None
        if learn.opt is None
        else {
            "groups": group_names(learn.model, learn.opt),
            "layer_groups": layer_group_names(learn.model, learn.param_groups()),
        },
        "opt_type": None
        if learn.opt is None
        else optimizer_type_name(getattr(learn.opt, "optimizer", learn.opt)),
        "epoch": learn.epoch,
        "iteration": learn.iteration,
        "recorder": learn.recorder.state_dict(),
        "rng": rng_state(loader_generators(learn.data.train_dl.dl)),
    }
    return learn.ranks.save(checkpoint, path)  # rank 0 writes


def load_learner_(learn: LearnerLike, path: Path) -> None:
    """Load the checkpoint at `path` into `learn`: all of it, or, if it does not fit,
    nothing (a ValueError names what differs)."""
    checkpoint = load_checkpoint(path, map_location=learn.data.device)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Learner checkpoint (written by learn.save).")
    mp = learn.mixed_precision
    if bool(checkpoint.get("mixed_precision")) != (mp is not None):
        fix = "learn.to_fp16(...)" if mp is None else "learn.to_fp32()"
        saved = "in mixed precision" if mp is None else "in fp32"
        raise ValueError(f"{path} was saved {saved}; call {fix} before learn.load().")
    if mp is not None:
        mp.check_state_dict(checkpoint.get("opt"))  # another mode's: refuse, load nothing
        mp.prepare()
    opt = learn.opt
    if opt is None and checkpoint.get("opt") is not None:
        opt = learn._build_opt()  # kept only if the checkpoint loads
    # All of it, before anything changes: model, optimizer, scaler, counters, history.
    opt_state = check_checkpoint_fits(learn, checkpoint, path, opt)
    with deferred_interrupt():  # loaded whole: a Ctrl-C waits until the end
        learn.model.load_state_dict(checkpoint["model"])
        if opt_state is not None:
            learn.opt = opt
            opt.load_state_dict(opt_state)  # masters -> model, under mixed precision
        learn.epoch = int(checkpoint.get("epoch", 0))
        learn.iteration = int(checkpoint.get("iteration", 0))
        learn.recorder.load_state_dict(checkpoint.get("recorder", {}))
        if (rng := learn.ranks.own_rng(checkpoint)) is not None:  # under torchrun, this rank's
            set_rng_state(rng, loader_generators(learn.data.train_dl.dl))
