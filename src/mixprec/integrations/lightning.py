"""`MixedPrecisionPlugin`: mixprec's mixed precision as a Lightning precision plugin.

With the Trainer::

    from mixprec.integrations.lightning import MixedPrecisionPlugin

    trainer = lightning.Trainer(plugins=[MixedPrecisionPlugin(torch.bfloat16)])
    trainer.fit(lit_module)          # configure_optimizers() returns a plain torch optimizer

With Fabric (the same class)::

    plugin = MixedPrecisionPlugin(torch.float16, loss_scale="dynamic")
    fabric = lightning.Fabric(plugins=[plugin])
    model, opt = fabric.setup(model, opt)
    fabric.backward(loss)
    if opt.step():                   # False: the gradients overflowed, the step was skipped
        scheduler.step()
    opt.zero_grad()

Mode "master" (the default): the model is converted to half (norm layers fp32) and the
optimizer Lightning builds is wrapped in a `MixedPrecisionOptimizer`, whose fp32 masters take
the exact fp32 weights the model had before conversion. Mode "autocast": the model stays fp32,
forward and loss run under `torch.autocast`, the optimizer is wrapped in an
`AutocastOptimizer`. The mixed-precision step (scale, unscale, check, skip, clip) is the
engine's; this module only connects it to Lightning's hooks.

A Trainer checkpoint made in mode "master" holds the fp32 master values under the module's
parameter names in `"state_dict"` (so an fp32 copy of the module loads it as it is), the
optimizer moments and the loss scaler in `"optimizer_states"`, and the plugin's mode and dtype
under `"MixedPrecisionPlugin"`; the masters are not stored twice. Lightning 2.x needs
`lightning.pytorch` and `lightning.fabric`; import this module only where Lightning is
installed (`pip install mixprec[lightning]`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.core.checks import check_trainable
from mixprec.core.config import PrecisionConfig
from mixprec.core.convert import cast_floats, model_to_float, restore_fp32_
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.master import masters_from_values
from mixprec.core.modes import Mode
from mixprec.core.policy import DEFAULT_FP32, PrecisionPolicy, Rule
from mixprec.core.scaler import LossScale, LossScaler
from mixprec.engine.autocast import autocast_region, device_type_of
from mixprec.engine.conversion import to_half_keeping_exact
from mixprec.engine.forensics import OverflowReport, clip_grad_norm_if_finite_
from mixprec.engine.from_config import Engine, build_engine
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.engine.wrapper import OptimizerWrapper
from mixprec.parallel.distributed import broadcast_from_rank0_, unwrap

__all__ = ["MixedPrecisionPlugin"]

METRICS = (
    "mixprec/loss_scale",
    "mixprec/skipped_steps",
    "mixprec/step_skipped",
    "mixprec/grad_norm",
)
"""The metrics the plugin logs after every optimizer step of a Trainer run (`log_metrics`)."""

_MASTERS_IN_STATE_DICT = "master_names"  # optimizer_states[0] key replacing "masters"


class MixedPrecisionPlugin(Precision):
    """Lightning precision plugin running mixprec's mixed precision, for Trainer and Fabric.

    `dtype`: torch.bfloat16 (default) or torch.float16. `mode`: "master" (half model, fp32
    masters) or "autocast" (fp32 model under torch.autocast). `loss_scale`: "dynamic" or a
    static number. Keyword options: `flat_master`, `fused` (Adam/AdamW: step the masters
    straight from the half gradients), `clip` (max global norm of the unscaled fp32
    gradients), `keep_fp32` (module types or a `PrecisionPolicy` kept fp32 in mode "master"),
    `log_metrics` (Trainer: log `METRICS` after each step) and the `LossScaler` keywords
    (`init_scale`, `growth_factor`, `backoff_factor`, `growth_interval`, `hysteresis`,
    `min_scale`, `max_scale`, `floor_patience`).

    A step whose gradients overflowed changes no weight and no optimizer state;
    `step_was_skipped` says so, `last_overflow` names the parameters, and lr schedulers with
    `interval="step"` do not step after it. Trainer `gradient_clip_val` clips the unscaled
    fp32 master gradients (an overflowing step keeps its inf/nan, so the report can name them).
    One optimizer per plugin: an engine scales the loss for the optimizer it wraps, and
    Lightning's backward does not say which optimizer the loss is for.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.bfloat16,
        mode: Mode = "master",
        loss_scale: LossScale = "dynamic",
        *,
        flat_master: bool = False,
        fused: bool | None = None,
        clip: float | None = None,
        keep_fp32: tuple[Rule, ...] | PrecisionPolicy = DEFAULT_FP32,
        log_metrics: bool = True,
        **scaler_options: Any,
    ) -> None:
        self.config = PrecisionConfig(
            dtype=dtype, mode=mode, loss_scale=loss_scale, flat_master=flat_master,
            fused=fused, clip=clip, scaler_options=scaler_options, call="MixedPrecisionPlugin",
        )  # fmt: skip
        self.mode, self.dtype, self.loss_scale = mode, dtype, loss_scale
        self.flat_master, self.fused, self.clip = flat_master, fused, self.config.clip
        self.scaler_options = self.config.scaler_options
        self.keep_fp32 = keep_fp32
        self.log_metrics = bool(log_metrics)
        self.precision = "bf16-mixed" if self.dtype == torch.bfloat16 else "16-mixed"
        self.optimizer: Engine | None = None  # the engine, once an optimizer is known
        self.step_was_skipped = False  # whether the last optimizer step overflowed
        self._module: nn.Module | None = None  # the module convert_module() was given
        self._exact: dict[int, torch.Tensor] = {}  # fp32 values before conversion, by id
        self._hook: RemovableHandle | None = None  # casts the module's outputs to fp32
        self._trainer = False  # connect() was called: a Trainer run, not Fabric
        self._unscaled = False  # unscale_() ran for the step in progress
        self._norm: torch.Tensor | None = None  # grad norm of the step in progress
        self._last_norm: torch.Tensor | None = None  # grad norm of the last step
        self._early_backward = False  # Fabric: a backward ran before the optimizer was known
        self._saved_state: Mapping[str, Any] | None = None  # Fabric: loaded before the engine

    # -- what Lightning reads ---------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale (before the first step: the one it will start at)."""
        if self.optimizer is not None:
            return self.optimizer.loss_scale
        return self._early_scaler().scale

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because of overflow."""
        return 0 if self.optimizer is None else self.optimizer.skipped_steps

    @property
    def last_overflow(self) -> OverflowReport | None:
        """Mode "master": which parameters had inf/nan gradients in the last skipped step."""
        return getattr(self.optimizer, "last_overflow", None)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """Global norm of the unscaled gradients of the last step (before clipping); None
        when none was computed (a fused step without clipping, or `log_metrics=False` and
        no clipping)."""
        return self._last_norm

    # -- the model and its inputs -----------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Mode "master": the module in half (norm layers fp32), its outputs returned in fp32
        so that the loss is reduced in fp32; its fp32 values kept for the masters."""
        self._remove_hook()
        self._module = module
        if self.mode == "autocast":
            if any(p.dtype in HALF_DTYPES for p in module.parameters()):
                model_to_float(module)  # autocast runs an fp32 model
            return module
        check_trainable(module, frozen_ok=True)
        self._exact = to_half_keeping_exact(module, self.dtype, self.keep_fp32)
        self._hook = module.register_forward_hook(_to_fp32_output)
        return module

    def convert_input(self, data: Any) -> Any:
        """Mode "master": the batch's floating tensors in the half dtype."""
        return cast_floats(data, self.dtype) if self.mode == "master" else data

    def convert_output(self, data: Any) -> Any:
        """Floating outputs in fp32 (Fabric calls this after forward)."""
        return cast_floats(data, torch.float32)

    def forward_context(self) -> AbstractContextManager:
        """Mode "autocast": `torch.autocast` in `dtype`; mode "master": nothing (the model
        itself is half)."""
        if self.mode == "master":
            return nullcontext()
        if self.optimizer is not None:
            return self.optimizer.autocast()  # type: ignore[union-attr]
        params = self._module.parameters() if self._module is not None else ()
        return autocast_region(device_type_of(params), self.dtype)

    # -- Trainer: the optimizer -------------------------------------------------------------
    def connect(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[torch.optim.Optimizer], list[Any]]:
        """Wrap the one optimizer in the engine; step-interval lr schedulers step only after
        applied steps."""
        self._trainer = True
        if not optimizers or optimizers[0] is self.optimizer:  # validate/test/predict
            return model, optimizers, lr_schedulers
        if len(optimizers) > 1:
            raise ValueError(
                f"MixedPrecisionPlugin drives one optimizer; configure_optimizers() returned "
                f"{len(optimizers)}. Lightning's backward does not say which optimizer a loss "
                "is for, so one loss scale cannot serve several. Return one optimizer (with "
                "several param groups if needed)."
            )
        engine = self._wrap(optimizers[0], unwrap(model))
        for config in lr_schedulers:
            if config.interval == "step" and not isinstance(config.scheduler, _AppliedStepsOnly):
                config.scheduler = _AppliedStepsOnly(config.scheduler, self)
        return model, [engine], lr_schedulers

    def pre_backward(self, tensor: torch.Tensor, module: Any) -> Any:
        """Trainer: the loss times the loss scale, then Lightning's on_before_backward hooks."""
        if not self._trainer:
            return None
        return super().pre_backward(self._engine().scale_loss(tensor), module)

    def backward(self, tensor: torch.Tensor, model: Any, *args: Any, **kwargs: Any) -> None:
        """Backward of the scaled loss (Trainer: scaled by `pre_backward`)."""
        if self._trainer:
            super().backward(tensor, model, *args, **kwargs)
            return
        if self.optimizer is None:  # Fabric's first backward: the optimizer is known at step
            self._early_backward = True
            scaled = self._early_scaler().scale_loss(tensor)
        else:
            scaled = self.optimizer.scale_loss(tensor)
        scaled.backward(*args, **kwargs)

    def post_backward(self, tensor: torch.Tensor, module: Any) -> Any:
        """Trainer: Lightning's on_after_backward hooks."""
        return super().post_backward(tensor, module) if self._trainer else None

    def optimizer_step(
        self,
        optimizer: Any,
        model: nn.Module | None = None,
        closure: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure, unscale, run Lightning's on_before_optimizer_step and clipping,
        then the engine's step (skipped on overflow). Fabric: returns whether it was applied."""
        if not self._trainer:
            if kwargs.get("closure") is not None:
                raise TypeError(_NO_CLOSURE)
            engine = self._engine(optimizer)
            self._unscaled = False  # the next step unscales afresh, even if this one raises
            applied = engine.step()
            self._after_step(applied, None)
            return applied
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(_NO_CLOSURE)
        if kwargs:
            raise TypeError(
                f"MixedPrecisionPlugin's step takes no arguments; got {sorted(kwargs)}."
            )
        assert closure is not None and isinstance(model, LightningModule)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return closure_result  # training_step returned None: no backward, nothing to step
        engine = self._engine()
        if not engine.fused or self.log_metrics:
            # the fused step unscales from the half grads itself, unless clipping or the
            # logged gradient norm asks first (log_metrics=False: the one-pass step)
            self._unscale_once()
        self._after_closure(model, optimizer)  # hooks, then configure_gradient_clipping
        self._unscaled = False  # the next step unscales afresh, even if this one raises
        applied = engine.step()
        self._after_step(applied, model)
        return closure_result

    # -- clipping -----------------------------------------------------------------------------
    def clip_gradients(
        self,
        optimizer: Any,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """Clip the unscaled fp32 gradients (the masters' in mode "master")."""
        if clip_val is None or clip_val <= 0:
            return
        self._unscale_once()
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        """Clip to a global norm, leaving inf/nan gradients as they are (the step is skipped)."""
        norm = clip_grad_norm_if_finite_(list(self._main_params()), float(clip_val))
        if self._norm is None:
            self._norm = norm

    @torch.no_grad()
    def clip_grad_by_value(self, optimizer: Any, clip_val: float) -> None:
        """Clamp each gradient to [-clip_val, clip_val]; inf stays inf, so the overflow report
        still names it."""
        for p in self._main_params():
            if p.grad is not None:
                g = p.grad
                g.copy_(torch.where(g.isinf(), g, g.clamp(-clip_val, clip_val)))

    def main_params(self, optimizer: Any) -> Iterator[torch.Tensor]:
        """The parameters the optimizer steps: the fp32 masters in mode "master"."""
        self._engine(optimizer)
        return self._main_params()

    def unscale_gradients(self, optimizer: Any) -> None:
        """Fabric's clip_gradients: unscale into the fp32 gradients first."""
        self._engine(optimizer)
        self._unscale_once()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Trainer: the mode and dtype (the engine's state is in "optimizer_states");
        Fabric: also the engine's state (masters, optimizer, scaler) under "engine"."""
        state: dict[str, Any] = {"mode": self.mode, "dtype": str(self.dtype)}
        if not self._trainer and self.optimizer is not None:
            state["engine"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check the mode and dtype; Fabric: restore the engine's state (at its first step if
        the optimizer is not known yet)."""
        self._check_saved(state_dict)
        if self._trainer or "engine" not in state_dict:
            return
        if self.optimizer is None:
            self._saved_state = state_dict["engine"]
        else:
            self.optimizer.load_state_dict(state_dict["engine"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mode "master": put the fp32 masters into `checkpoint["state_dict"]` under their
        names and keep only those names in the optimizer state, so they are stored once."""
        engine = self.optimizer
        if not isinstance(engine, MixedPrecisionOptimizer) or self._module is None:
            return
        states = checkpoint.get("optimizer_states")
        weights = checkpoint.get("state_dict")
        if not states or weights is None or "masters" not in states[0]:
            return
        names = _names_by_param(self._module)
        values = engine.master_values()
        for p in (p for group in engine.model_params for p in group):
            for name in names.get(p, ()):
                if name in weights:
                    weights[name] = values[id(p)]
        saved = dict(states[0])
        del saved["masters"]
        saved[_MASTERS_IN_STATE_DICT] = [
            [names[p][0] for p in params] for params in engine.model_params
        ]
        states[0] = saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another mode; rebuild the masters the optimizer state needs
        from `checkpoint["state_dict"]`."""
        saved = checkpoint.get(type(self).__qualname__)
        if isinstance(saved, Mapping):
            self._check_saved(saved)
        states = checkpoint.get("optimizer_states")
        if not states or not isinstance(states[0], Mapping):
            return
        if _MASTERS_IN_STATE_DICT not in states[0]:
            return
        weights = checkpoint["state_dict"]
        state = dict(states[0])
        groups = state.pop(_MASTERS_IN_STATE_DICT)
        missing = [n for group in groups for n in group if n not in weights]
        if missing:
            raise ValueError(
                f"the checkpoint's optimizer state names masters that its state_dict lacks: "
                f"{missing[:5]}. It was not saved by this plugin from this model."
            )
        values = [[weights[n] for n in group] for group in groups]
        params = dict(self._module.named_parameters()) if self._module is not None else {}
        if state.get("flat_master", False) and not all(n in params for g in groups for n in g):
            raise ValueError(
                "the checkpoint holds flat masters, whose layout follows the model's "
                "parameters; load it after the plugin has set up the module (trainer.fit)."
            )
        like = [[params.get(n, weights[n]) for n in group] for group in groups]
        state["masters"] = masters_from_values(like, values, state.get("flat_master", False))
        states[0] = state

    def teardown(self) -> None:
        """Trainer: back to an fp32 module holding the master values (or, if nothing was
        trained, the exact values it came with); outputs no longer cast."""
        self._remove_hook()
        module = self._module
        if module is None or self.mode != "master" or not self._trainer:
            return
        if isinstance(self.optimizer, MixedPrecisionOptimizer):
            exact = self.optimizer.master_values()
            self.optimizer.release()  # a later fit, by this plugin or another, wraps anew
        else:
            exact = self._exact
        restore_fp32_(module, exact)
        self._exact = {}

    # -- internals ----------------------------------------------------------------------------
    def _wrap(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Engine:
        """The engine of this plugin's mode around `optimizer` (built on the converted
        `model`), its masters the exact fp32 values the model had; every rank takes rank 0's,
        as DDP gives every rank rank 0's weights. The loss scale of an earlier fit carries on."""
        previous = self.optimizer
        if isinstance(optimizer, OptimizerWrapper):  # another plugin's engine: its masters
            if isinstance(optimizer, MixedPrecisionOptimizer):
                self._exact.update(optimizer.master_values())
                optimizer.release()
            optimizer = optimizer.optimizer
        engine = build_engine(self.config, optimizer, model)
        if isinstance(engine, MixedPrecisionOptimizer):
            engine.load_master_values_(self._exact)
            broadcast_from_rank0_(engine.master_tensors())
        if previous is not None:  # another fit: the loss scale carries on
            engine.scaler.load_state_dict(previous.scaler.state_dict())
        self._exact = {}
        self.optimizer = engine
        return engine

    def _engine(self, optimizer: Any = None) -> Engine:
        """The engine; Fabric: built around `optimizer` at its first step."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a Lightning/FabricOptimizer
        if self.optimizer is not None:
            if optimizer is not None and optimizer not in (
                self.optimizer,
                self.optimizer.optimizer,
            ):
                raise ValueError(
                    "MixedPrecisionPlugin drives one optimizer; this run steps a second one. "
                    "Use one optimizer (with several param groups if needed)."
                )
            return self.optimizer
        if optimizer is None or self._trainer or self._module is None:
            raise RuntimeError(
                "MixedPrecisionPlugin has no optimizer yet: with Fabric, call "
                "fabric.setup(model, optimizer) and step the optimizer it returns; with the "
                "Trainer, return the optimizer from configure_optimizers()."
            )
        engine = self._wrap(optimizer, self._module)
        if self._saved_state is not None:
            # fabric.load() came before the optimizer was known; loading drops the gradients
            # of any backward since, so they are put back.
            grads = {p: p.grad.clone() for p in self._module.parameters() if p.grad is not None}
            engine.load_state_dict(self._saved_state)
            self._saved_state = None
            with torch.no_grad():
                for p, grad in grads.items():
                    if p.grad is None:
                        p.grad = grad
                    else:
                        p.grad.copy_(grad)
        if self._early_backward:  # that backward's gradients (at the initial scale) count
            engine.scale_loss(torch.zeros(()))
            self._early_backward = False
        return engine

    def _early_scaler(self) -> LossScaler:
        """The scaler the engine will start with: fresh, or the one a checkpoint restores."""
        scaler = self.config.new_scaler()
        if self._saved_state is not None:
            scaler.load_state_dict(self._saved_state["scaler"])
        return scaler

    def _unscale_once(self) -> None:
        """Move the gradients into fp32, unscaled and checked, once per step; note their
        norm (before any clipping) for the metrics."""
        if self._unscaled:
            return
        engine = self._engine()
        engine.unscale_()
        self._unscaled = True
        if engine.clip is not None:
            self._norm = engine.last_grad_norm
        elif self.log_metrics:
            grads = [p.grad for p in self._main_params() if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None

    def _main_params(self) -> Iterator[torch.Tensor]:
        for group in self._engine().param_groups:
            yield from group["params"]

    def _after_step(self, applied: bool, model: nn.Module | None) -> None:
        engine = self._engine()
        self.step_was_skipped = not applied
        norm, self._norm = self._norm, None
        if norm is None and engine.fused and engine.clip is not None:
            norm = engine.last_grad_norm  # the fused step computed it
        self._last_norm = norm
        if not (self.log_metrics and isinstance(model, LightningModule)):
            return
        metrics: dict[str, Any] = {
            "mixprec/loss_scale": engine.loss_scale,
            "mixprec/skipped_steps": float(engine.skipped_steps),
            "mixprec/step_skipped": float(not applied),
        }
        if norm is not None:
            metrics["mixprec/grad_norm"] = norm.detach().float().reshape(())
        model.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _check_saved(self, saved: Mapping[str, Any]) -> None:
        mode, dtype = saved.get("mode", self.mode), saved.get("dtype", str(self.dtype))
        if mode != self.mode or dtype != str(self.dtype):
            raise ValueError(
                f"this checkpoint was saved by MixedPrecisionPlugin(mode={mode!r}, dtype={dtype}) "
                f"but is being loaded by MixedPrecisionPlugin(mode={self.mode!r}, "
                f"dtype={self.dtype}). Resume with the plugin it was saved with."
            )

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        return (
            f"MixedPrecisionPlugin(dtype={self.dtype}, mode={self.mode!r}, "
            f"loss_scale={self.loss_scale!r}, flat_master={self.flat_master}, "
            f"fused={self.fused}, clip={self.clip})"
        )


_NO_CLOSURE = (
    "MixedPrecisionPlugin steps without a closure: an optimizer that re-evaluates the loss "
    "(LBFGS, step(closure)) cannot skip an overflowing step cleanly. Use a first-order "
    "optimizer such as torch.optim.AdamW."
)


def _to_fp32_output(module: nn.Module, args: tuple, output: Any) -> Any:
    return cast_floats(output, torch.float32)


def _names_by_param(module: nn.Module) -> dict[torch.Tensor, list[str]]:
    """Every name of each parameter of `module` (a tied parameter has several)."""
    names: dict[torch.Tensor, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    return names


class _AppliedStepsOnly:
    """An lr scheduler that steps only when the plugin's last optimizer step was applied.

    Lightning steps "step"-interval schedulers after every optimizer step; after a skipped
    one the lr must not move. Everything else (state_dict, get_last_lr, optimizer, ...) is
    the wrapped scheduler's, so checkpoints and LearningRateMonitor see the scheduler itself.
    """

    def __init__(self, scheduler: Any, plugin: MixedPrecisionPlugin) -> None:
        self.scheduler = scheduler
        self._plugin = plugin

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._plugin.step_was_skipped:
            self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # only names the class lacks
        return getattr(self.__dict__["scheduler"], name)
