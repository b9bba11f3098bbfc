"""The documented `MixedPrecision` callback, as thin glue over `MixedPrecisionOptimizer`.

Also re-exports the documented primitives, so that
`from mixprec.learner.mixed_precision import get_master, model_g2master_g, master2model, MixedPrecision`
works as it did in fastai v1.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Literal

import torch

from mixprec.core.checks import (
    check_optimizer_holds,
    check_trainable,
    held_params,
)
from mixprec.core.config import PrecisionConfig
from mixprec.core.convert import cast_floats, model_to_float, restore_fp32_
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.master import (
    get_master,
    master2model,
    master_views,
    model_g2master_g,
)
from mixprec.core.modes import Mode, check_saved_mode
from mixprec.core.scaler import LossScale
from mixprec.engine.autocast import AutocastOptimizer, autocast_region, device_type_of
from mixprec.engine.conversion import to_half_keeping_exact
from mixprec.engine.from_config import build_engine
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.engine.telemetry import Telemetry
from mixprec.learner.callback import Callback, LearnerLike

__all__ = ["MixedPrecision", "get_master", "master2model", "model_g2master_g"]


def batch_to_half(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with the floating tensors of its input (first element) cast to `dtype`."""
    x, *rest = batch
    return (cast_floats(x, dtype), *rest)


class MixedPrecision(Callback):
    """Train the learner's model in half precision with fp32 master weights.

    `loss_scale`: a positive number (static scaling, default 512) or "dynamic". Keyword
    options: `dtype` (torch.float16 or torch.bfloat16), `clip` (max global norm of the
    unscaled fp32 master gradients), `fused` (step the masters straight from the half
    gradients; default None: whenever the optimizer is Adam/AdamW, `fused=False` opts out;
    see `MixedPrecisionOptimizer`), `master` ("fp32", or "split": bf16 models with Adam/AdamW
    keep each master as the bf16 weight plus 16 low bits; with `fused=True` AdamW's state is
    then 14 bytes a parameter) and the `LossScaler` keywords (`init_scale`, `growth_factor`,
    `backoff_factor`, `growth_interval`, `hysteresis`, `min_scale`, `max_scale`,
    `floor_patience`). `Learner.to_fp16(**options)` builds and adds one.

    `mode="master"` (the default) is the documented recipe: a half model stepping fp32
    masters. `mode="autocast"` keeps the model fp32 and runs the forward and the loss under
    `torch.autocast(device_type, dtype)` (no masters, so no `flat_master`; `fused` runs
    torch's fused Adam(W) kernel on the fp32 parameters), with the same loss scaling.
    `telemetry=N` (or a `Telemetry`) records the loss scale, overflow, gradient norm and
    non-finite count of every step on the device, read back every N steps (the Recorder
    keeps and plots them; `CSVLogger` writes them).

    The work is done by one `MixedPrecisionOptimizer` or `AutocastOptimizer` (`self.opt`),
    built once and kept across `fit()` calls, so masters, optimizer moments and the scaler
    carry on.
    """

    order = 99  # last: earlier callbacks see the unscaled loss and the half model's grads

    def __init__(
        self,
        learn: LearnerLike,
        loss_scale: LossScale = 512.0,
        flat_master: bool = False,
        *,
        dtype: torch.dtype = torch.float16,
        clip: float | None = None,
        fused: bool | None = None,
        mode: Mode = "master",
        master: Literal["fp32", "split"] = "fp32",
        telemetry: int | Telemetry | None = None,
        **scaler_options: Any,
    ) -> None:
        self.config = PrecisionConfig(
            dtype=dtype, mode=mode, loss_scale=loss_scale, flat_master=flat_master,
            fused=fused, master=master, clip=clip, scaler_options=scaler_options,
        )  # fmt: skip
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            telemetry = Telemetry(every=telemetry)
        self.telemetry = telemetry
        self.learn = learn
        self.opt: MixedPrecisionOptimizer | AutocastOptimizer | None = None
        self._tfm = partial(batch_to_half, dtype=self.config.dtype)
        self._frozen_flat: list[torch.Tensor] = []
        self._frozen_exact: dict[int, torch.Tensor] = {}  # frozen parameters' fp32 values

    # the options, as the config holds them
    mode = property(lambda self: self.config.mode)
    dtype = property(lambda self: self.config.dtype)
    loss_scale = property(lambda self: self.config.loss_scale)
    flat_master = property(lambda self: self.config.flat_master)
    fused = property(lambda self: self.config.fused)
    master = property(lambda self: self.config.master)
    clip = property(lambda self: self.config.clip)
    scaler_options = property(lambda self: self.config.scaler_options)

    def prepare(self) -> MixedPrecisionOptimizer | AutocastOptimizer:
        """Convert the model to half (mode "master"; to fp32 under "autocast") and wrap the
        learner's optimizer (once; later calls only convert and add parameters new to the
        optimizer). Masters take the fp32 values the model had before conversion, not their
        rounded half copies."""
        learn = self.learn
        check_trainable(learn.model, frozen_ok=True)  # refuse before converting anything
        if learn.opt is not None and not isinstance(
            learn.opt, (MixedPrecisionOptimizer, AutocastOptimizer)
        ):
            check_optimizer_holds(learn.model, held_params(learn.opt), every_trainable=False)
        # On any failure below (opt_func raising or returning no optimizer, an optimizer the
        # engine refuses, Ctrl-C) the model gets back its exact tensors, dtypes included,
        # and learn.opt what it was.
        before = _ModelTensors(learn.model)
        opt_before, own_before = learn.opt, self.opt
        try:
            with deferred_interrupt():
                exact = {}
                if self.mode == "master":
                    exact = to_half_keeping_exact(learn.model, self.dtype, None)
                    # a frozen parameter gets no master (the engine's rule); keep its exact
                    # fp32 value for when it is unfrozen, as its master would have been
                    frozen = {id(p) for p in learn.model.parameters() if not p.requires_grad}
                    self._frozen_exact.update((k, v) for k, v in exact.items() if k in frozen)
                    if isinstance(self.opt, MixedPrecisionOptimizer) and learn.opt is self.opt:
                        # parameters with a master keep it: the model's value is at best its
                        # rounding (say the user called model.float() between fits)
                        held = self.opt.master_values()
                        exact = {k: v for k, v in exact.items() if k not in held}
                        self.opt.reseat_model_()  # flat buffers take the parameters back
                elif any(p.dtype in HALF_DTYPES for p in learn.model.parameters()):
                    model_to_float(learn.model)  # autocast runs an fp32 model
                if self.opt is None or learn.opt is not self.opt:
                    if isinstance(learn.opt, (MixedPrecisionOptimizer, AutocastOptimizer)):
                        raise ValueError(
                            f"learn.opt is already a {type(learn.opt).__name__} of another "
                            "callback; use one MixedPrecision per Learner (learn.to_fp16() "
                            "adds it)."
                        )
                    if isinstance(self.opt, MixedPrecisionOptimizer):  # create_opt() replaced it
                        exact.update(_masters_by_param(self.opt))  # its masters, not the rounding
                        self.opt.release()  # the new wrapper holds the parameters from now on
                    inner = learn.opt if learn.opt is not None else learn._build_opt()
                    self.opt = self._engine(inner)
                    learn.opt = self.opt
                return self._attach(exact)
        except BaseException:
            before.restore_()
            if isinstance(own_before, MixedPrecisionOptimizer) and own_before._released:
                own_before.hold()  # released above for the new wrapper, which was refused
            learn.opt, self.opt = opt_before, own_before
            raise

    def _attach(
        self, exact: dict[int, torch.Tensor]
    ) -> MixedPrecisionOptimizer | AutocastOptimizer:
        """Telemetry, parameters new to the optimizer, exact fp32 values into the masters."""
        learn = self.learn
        if self.telemetry is not None and self.opt.telemetry is not self.telemetry:
            self.telemetry.attach(self.opt)
        learn.add_new_params()
        if isinstance(self.opt, MixedPrecisionOptimizer):
            taken = self.opt.take_unfrozen_()  # unfrozen since the last fit: exact masters
            exact = {**exact, **{id(p): self._frozen_exact.pop(id(p)) for p in taken if id(p) in self._frozen_exact}}  # fmt: skip
            if exact:
                self.opt.load_master_values_(exact)
        return self.opt

    def _engine(self, inner: torch.optim.Optimizer) -> MixedPrecisionOptimizer | AutocastOptimizer:
        """The optimizer wrapper of this mode, around `inner`."""
        return build_engine(self.config, inner, self.learn.model)

    def forward_context(self) -> AbstractContextManager:
        """The region the Learner runs the forward pass and the loss in: `torch.autocast`
        under mode "autocast", nothing under "master" (the model itself is half)."""
        if self.mode == "master":
            return nullcontext()
        if self.opt is not None:
            return self.opt.autocast()
        return autocast_region(device_type_of(self.learn.model.parameters()), self.dtype)

    def check_state_dict(self, state_dict: Mapping[str, Any] | None) -> None:
        """Raise ValueError if an optimizer `state_dict` (from a checkpoint) was saved in
        another mode, before anything is loaded."""
        if isinstance(state_dict, Mapping):
            check_saved_mode(state_dict, self.mode)

    def release(self) -> None:
        """Back to fp32: the model takes the master values and the optimizer, with its state,
        steps the model's parameters again."""
        learn = self.learn
        learn.data.remove_tfm(self._tfm)
        opt, self.opt = self.opt, None
        if isinstance(opt, MixedPrecisionOptimizer):
            opt.release()  # its parameters are the fp32 model's again
        if isinstance(opt, MixedPrecisionOptimizer) and learn.opt is not opt:  # create_opt()
            restore_fp32_(learn.model, _masters_by_param(opt))
        elif opt is None or learn.opt is not opt:
            model_to_float(learn.model)
        elif isinstance(opt, AutocastOptimizer):  # the model is fp32 already
            opt.zero_grad()
            learn.opt = opt.optimizer
        else:
            learn.opt = _unwrap(opt, learn.model)

    # -- the documented events ------------------------------------------------------------
    def on_train_begin(self, **kwargs: Any) -> None:
        """Model in half (norm layers fp32), inputs cast to half by a data transform, the
        optimizer stepping fp32 masters (kept from a previous fit)."""
        opt = self.prepare()
        self._frozen_flat = _frozen_flat_masters(opt)
        if self.mode == "master" and self._tfm not in self.learn.data.tfms:
            self.learn.data.add_tfm(self._tfm)

    def on_loss_begin(self, last_output: Any, **kwargs: Any) -> Any:
        """The output in fp32, so the loss reduction cannot overflow."""
        return cast_floats(last_output, torch.float32)

    def on_backward_begin(self, last_loss: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The loss times the loss scale, for backward only."""
        return self.opt.scale_loss(last_loss)

    def on_backward_end(self, **kwargs: Any) -> None:
        """Model grads to fp32 master grads, divided by the scale, checked for inf/nan.

        With `fused=True` the step does this itself, from the half grads, keeping no fp32
        grads (unless a flat group is frozen: a fused flat step would move it). By default
        (`fused=None`) the master grads are filled here as documented, and the step then runs
        the fused Adam(W) kernel on them when it can."""
        if self.fused is True and self.opt.fused and not self._frozen_flat:
            return
        self.opt.unscale_()
        for master in self._frozen_flat:  # no grad: the optimizer leaves frozen groups alone
            master.grad = None

    def on_step_end(self, **kwargs: Any) -> None:
        """Nothing left to do: the optimizer's step copied the masters into the model and
        zeroed the model grads (a skipped step changed neither)."""

    def on_train_end(self, **kwargs: Any) -> None:
        """Remove the input transform added at `on_train_begin`."""
        self.learn.data.remove_tfm(self._tfm)

    def __repr__(self) -> str:
        return (
            f"MixedPrecision(loss_scale={self.loss_scale!r}, flat_master={self.flat_master}, "
            f"dtype={self.dtype}, clip={self.clip}, fused={self.fused}, mode={self.mode!r}, "
            f"master={self.master!r})"
        )


class _ModelTensors:
    """A model's parameter and buffer tensors as they are now (references, no copies: a
    conversion replaces them rather than writing into them), to put back with `restore_`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [(p, p.data, p.grad) for p in model.parameters()]
        self.buffers = [
            (module, name, b) for module in model.modules() for name, b in module._buffers.items()
        ]
        self.model = model
        self.was_half = any(data.dtype in HALF_DTYPES for _, data, _ in self.params)

    @torch.no_grad()
    def restore_(self) -> None:
        """The model back to the tensors it had (and, if it was fp32, without hooks)."""
        if not self.was_half:
            model_to_float(self.model)  # removes the hooks model_to_half added
        for p, data, grad in self.params:
            p.data = data
            p.grad = grad
        for module, name, b in self.buffers:
            module._buffers[name] = b


def _masters_by_param(opt: MixedPrecisionOptimizer) -> dict[int, torch.Tensor]:
    """A copy of each model parameter's master value, by parameter id."""
    return {k: v.clone() for k, v in opt.master_values().items()}


def _frozen_flat_masters(opt: MixedPrecisionOptimizer) -> list[torch.Tensor]:
    """The flat masters whose parameters are all frozen (a flat master is stepped whole)."""
    if not opt.flat_master:
        return []  # per-parameter masters of frozen params get no grad and are not stepped
    frozen = []
    for params, masters in zip(opt.model_params, opt.master_params):
        flags = {p.requires_grad for p in params}
        if flags == {True, False}:
            raise ValueError(
                "flat_master=True steps each optimizer param group as one tensor, so a group "
                f"cannot mix frozen and trainable parameters; got {len(params)} parameters of "
                f"which {sum(not p.requires_grad for p in params)} are frozen. Freeze whole "
                "layer groups with learn.freeze_to(n), or use flat_master=False."
            )
        if flags == {False}:
            frozen.extend(masters)
    return frozen


def _unwrap(opt: MixedPrecisionOptimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Convert `model` to fp32 holding the master values, and re-point the wrapped optimizer
    (and its per-parameter state) from the masters to the model's parameters."""
    if opt.split is not None:  # the optimizer steps the model's parameters already
        values = opt.master_values()
        model_to_float(model)
        with torch.no_grad():
            for p in (p for group in opt.model_params for p in group):
                p.copy_(values[id(p)])
                p.grad = None
        return opt.optimizer
    model_to_float(model)
    master2model(opt.model_params, opt.master_params, opt.flat_master)
    inner = opt.optimizer
    for group, params, masters in zip(inner.param_groups, opt.model_params, opt.master_params):
        if opt.flat_master and masters:
            saved = inner.state.pop(masters[0], None)
            if saved:
                for i, p in enumerate(params):
                    inner.state[p] = {
                        k: _slice_state(v, masters[0], params, i) for k, v in saved.items()
                    }
        elif not opt.flat_master:
            for p, m in zip(params, masters):
                if m in inner.state:
                    inner.state[p] = inner.state.pop(m)
        group["params"] = list(params)
        for p in params:
            p.grad = None
    return inner


def _slice_state(value: Any, master: torch.Tensor, params: list[torch.Tensor], i: int) -> Any:
    """Parameter `i`'s part of one entry of a flat master's optimizer state."""
    if not torch.is_tensor(value):
        return value
    if value.shape == master.shape:  # per-element (moments): the parameter's view, its strides
        return master_views(params, [value], True)[i].clone()
    return value.clone()  # per-tensor (e.g. Adam's step count): shared by every parameter
