"""MixedPrecisionOptimizer: any torch optimizer stepping fp32 masters of a half model."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mixprec.core.checks import (
    check_optimizer_holds,
    check_optimizer_supported,
    check_param_group,
)
from mixprec.core.chunked import copy_unscale_check_
from mixprec.core.config import PrecisionConfig
from mixprec.core.convert import model_to_half, restore_fp32_
from mixprec.core.flat_group import FlatGroup
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.master import (
    check_master_params,
    make_masters,
    masters_by_param,
    new_group_params,
)
from mixprec.core.master_state import check_saved_masters, move_state_to_masters
from mixprec.core.optim_state import (
    check_held,
    check_optimizer_state_dict,
    drop_incomplete_state_,
    load_optimizer_state_dict,
    optimizer_type_name,
)
from mixprec.core.policy import PrecisionPolicy, Rule
from mixprec.core.scaler import LossScale, unscale_and_check_
from mixprec.engine import forensics
from mixprec.engine.conversion import conversion
from mixprec.engine.fused_items import FusedItem
from mixprec.engine.holders import check_not_held, hold, let_go
from mixprec.engine.master_set import MasterSet
from mixprec.engine.split_master import SplitMasters, check_split_options
from mixprec.engine.step_hooks import enable_step_hooks
from mixprec.engine.telemetry import NO_TELEMETRY
from mixprec.engine.updates import choose_update
from mixprec.engine.wrapper import OptimizerWrapper, StepState
from mixprec.parallel.distributed import is_data_parallel

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MixedPrecisionOptimizer"]


class MixedPrecisionOptimizer(OptimizerWrapper):
    """Wraps a torch optimizer so that it steps fp32 master weights of a half model.

    The loop::

        opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "dynamic",
                                      model=model, dtype=torch.float16)  # converts model
        for x, y in data:
            loss = loss_fn(model(x.half()).float(), y)
            opt.backward(loss)                            # scaled backward
            if opt.step():                                # False: overflow, step skipped
                scheduler.step()                          # advance only on applied steps
            opt.zero_grad()

    `backward` may be called several times before `step`: gradients accumulate in fp32.
    `step` moves the half gradients into the fp32 masters, unscales them and checks them for
    inf/nan in one fused pass (one host sync per step), clips them to the global norm
    `clip`, steps the wrapped optimizer and copies the masters back into the model.
    An overflowing step changes no weight and no optimizer state. The keyword options are
    those of `LossScaler`.

    `fused` (default None: on whenever the optimizer allows it, i.e. it is exactly
    torch.optim.Adam or AdamW) steps the masters straight from the half gradients with
    torch's fused kernel and keeps no fp32 gradient (16 bytes of state per parameter, not
    20); same numbers within fp32 rounding. `fused=False` opts out (the wrapped optimizer's
    own `step()` runs on fp32 master gradients); `fused=True` insists and refuses an
    optimizer it cannot fuse. See `mixprec.engine.fused_adam`. Unfused, element-wise
    optimizers (SGD, Adam, RMSprop, ...) step large masters, flat or per tensor, through
    cache-sized views of them (`mixprec.engine.view_step`): same numbers, faster.

    `master="split"` (bf16 models, Adam/AdamW) keeps each fp32 master as the bf16 weight
    plus 16 low bits, rebuilt chunk by chunk inside the fused step: 14 bytes of training
    state per parameter instead of 16, the fp32-master path's numbers bit for bit except
    for the rare master stored one ulp off (`mixprec.core.split`), a slower optimizer step.

    Data-parallel (`torch.distributed` initialized with more than one process in
    `process_group`, None meaning the default group): the overflow flag is all-reduced, so
    every rank steps or skips together even when only one rank saw an inf; and between
    backward() calls gradients accumulate in the model's half grads, where DDP's `no_sync()`
    leaves them for the backward that reduces them (moving them to the masters early would
    keep earlier micro-batches out of the reduction). `data_parallel=False` opts out, for an
    optimizer used on some ranks only.

    Built on the fp32 model's optimizer with `model=`, the wrapper converts `model` in
    place as `model_to_half(model, dtype, keep_fp32)` does (`dtype` default torch.float16,
    `keep_fp32` a tuple of rules or a `PrecisionPolicy`, default the norm layers) and takes
    the masters from the exact fp32 weights. Everything is checked before the model is
    touched: a refused wrapper leaves it fp32 with its weights bit-identical. An optimizer
    built on an already converted model works too, but its masters start from the rounded
    half weights (up to 2^-8 = 0.39 % relative in bf16, 2^-11 in fp16, from the fp32 values).
    Existing optimizer state moves to the masters either way.

    `model` also names the parameters in a skipped step's `last_overflow` report and in the
    persistent-overflow error (see `mixprec.engine.forensics`).

    Parameters with `requires_grad=False` get no master: the wrapped optimizer never steps
    them (a frozen base under LoRA costs no fp32 copy). One unfrozen later gets its master
    from its current value at the next step. `fp32_state_dict()` gives the model's state dict
    with every parameter's exact fp32 master, for an fp32 copy of the model or
    `save_pretrained(dir, state_dict=...)`.

    A plain `loss.backward()` (HF Trainer, Accelerate) instead of `backward(loss)` leaves
    unscaled gradients: `step()` takes them as they are (scale 1), checks and skips as usual.

    A parameter is held by one wrapper at a time (two would overwrite each other's update):
    `release()` hands them back.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        loss_scale: LossScale = "dynamic",
        *,
        flat_master: bool = False,
        clip: float | None = None,
        fused: bool | None = None,
        master: Literal["fp32", "split"] = "fp32",
        process_group: ProcessGroup | None = None,
        data_parallel: bool = True,
        model: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        keep_fp32: tuple[Rule, ...] | PrecisionPolicy | None = None,
        **scaler_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer built on the model's parameters; got "
                f"{type(optimizer).__name__}."
            )
        if isinstance(optimizer, MixedPrecisionOptimizer):
            raise TypeError("the optimizer is already a MixedPrecisionOptimizer; wrap it once.")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                "model must be the nn.Module whose parameters the optimizer holds; got "
                f"{type(model).__name__}."
            )
        if not isinstance(data_parallel, bool):
            raise TypeError(f"data_parallel must be True or False; got {data_parallel!r}.")
        check_optimizer_supported(optimizer, model if isinstance(model, nn.Module) else None)
        groups = [list(group["params"]) for group in optimizer.param_groups]
        check_master_params(groups, flat_master is True)
        # frozen parameters get no master: the optimizer would never step them
        model_params = [[p for p in g if p.requires_grad] for g in groups]
        frozen = [[p for p in g if not p.requires_grad] for g in groups]
        check_not_held(model_params)
        self.dtype, policy = conversion(groups, model, dtype, keep_fp32)
        self.config = PrecisionConfig(
            dtype=self.dtype, loss_scale=loss_scale, flat_master=flat_master, fused=fused,
            master=master, clip=clip, scaler_options=scaler_options,
            call="MixedPrecisionOptimizer",
        )  # fmt: skip
        clip = self.config.clip
        if master == "split":
            check_split_options(optimizer, model_params, bool(flat_master), fused)
        self.model = model
        self.param_names = {} if model is None else forensics.param_names(model, groups)
        self.scaler = self.config.new_scaler()
        self.update = choose_update(optimizer, fused, split=master == "split")
        # The fused update keeps no fp32 master grads between steps (16 B/param, not 20):
        # those a step had to make (unscale_() first, accumulation) are freed after it.
        self._lean = self.update.fused
        self.optimizer = optimizer
        self.flat_master = bool(flat_master)
        self.clip = clip
        self.process_group = process_group
        self.data_parallel = data_parallel
        self.model_params = model_params
        self.frozen_params = frozen
        # split: the optimizer steps the model's own parameters, their masters rebuilt from
        # the bf16 weights and 16 low bits inside the fused step (mixprec.engine.split_master).
        # Given an fp32 model, the masters are taken before converting it: exact copies.
        exact = (
            [[p.detach() for p in g] for g in model_params]  # conversion replaces, not writes
            if master == "split" and policy is not None
            else None
        )
        self.master_params = (
            [list(g) for g in model_params]
            if master == "split"
            else make_masters(model_params, self.flat_master)
        )
        if master != "split":
            move_state_to_masters(
                optimizer.state, model_params, self.master_params, self.flat_master
            )
        if policy is not None:
            try:
                model_to_half(model, self.dtype, policy)
            except BaseException:  # e.g. interrupted: the model back as it was
                restore_fp32_(
                    model,
                    masters_by_param(model_params, self.master_params, self.flat_master)
                    if exact is None
                    else {id(p): e for g, eg in zip(model_params, exact) for p, e in zip(g, eg)},
                )
                raise
        self.split = SplitMasters(model_params) if master == "split" else None
        if self.split is not None and exact is not None:
            self.split.load_(exact)  # weights rounded, low bits from the exact fp32 values
        self._flat_groups = (
            [FlatGroup(ps, ms[0]) for ps, ms in zip(model_params, self.master_params) if ps]
            if self.flat_master
            else []
        )
        for group, masters in zip(optimizer.param_groups, self.master_params):
            group["params"] = masters
        self._masters = MasterSet(
            model_params,
            self.master_params,
            self.flat_master,
            self._flat_groups,
            self.split,
            self.param_names,
            self.frozen_params,
        )
        if self.update.fused:
            self._masters.release_master_grads()  # made again only when a step needs them
        self.telemetry = NO_TELEMETRY  # or a mixprec.Telemetry: per-step records, no host sync
        self._init_step()
        self._masters.mark_clean()
        hold(self)
        enable_step_hooks(self)  # register_step_pre/post_hook work as on torch optimizers

    # -- the fp32 masters, by model parameter ----------------------------------------------
    def master_values(self) -> dict[int, torch.Tensor]:
        """Per model parameter (by id), its fp32 master: a view of the master shaped like the
        parameter, or for split masters a rebuilt copy."""
        return self._masters.values()

    def load_master_values_(self, values: Mapping[int, torch.Tensor]) -> None:
        """Set the master of each parameter in `values` (by id) to that fp32 value: the model
        keeps its weights (their rounding when it was converted from them), but for split
        masters, whose bf16 weight is the master's high half and is set with it."""
        self._masters.load_values_(values)

    def master_tensors(self) -> list[torch.Tensor]:
        """The tensors the masters live in (to broadcast them, say): the fp32 masters, or for
        split masters the model's parameters and the bf16 ones' low bits."""
        return self._masters.tensors()

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict (the keys of `model.state_dict()`) with every parameter
        holding its exact fp32 master (a frozen one, which has none, its value in fp32);
        buffers as the model holds them. Loadable by an fp32 copy of the model, and by
        `model.save_pretrained(dir, state_dict=opt.fp32_state_dict())`. New tensors."""
        if self.model is None:
            raise ValueError(
                "fp32_state_dict() names the masters by the model's parameter names; build the "
                "wrapper with model=: MixedPrecisionOptimizer(opt, model=model, ...)."
            )
        values = self.master_values()
        state = self.model.state_dict()
        copies: dict[int, torch.Tensor] = {}  # a tied parameter: one tensor under each name
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name in state:
                if id(p) not in copies:
                    value = values.get(id(p))
                    source = p.detach() if value is None else value
                    copies[id(p)] = source.to(torch.float32, copy=True)
                state[name] = copies[id(p)]
        return state

    def reseat_model_(self) -> None:
        """After the model's parameters were given new storage of the same dtype, shape and
        device (`model.float()` then a conversion back): the flat layout takes them back into
        its buffers and the model holds the masters' rounding again. A no-op per tensor and
        split (the masters are kept by parameter); refused, changing nothing, for a parameter
        of another dtype, shape or device."""
        self._masters.reseat_()

    def release(self) -> None:
        """Stop holding the model's parameters, so another wrapper may take them; this one
        refuses to step from now on."""
        self._released = True
        let_go(self)

    def hold(self) -> None:
        """Take the parameters back after `release()`; refused if another wrapper holds them."""
        check_not_held(self.model_params)
        self._released = False
        hold(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of model parameters; the wrapped optimizer gets fp32 masters of the
        trainable ones."""
        check_param_group(param_group)
        params = new_group_params(param_group["params"], [*self.model_params, *self.frozen_params])
        check_master_params([params], self.flat_master)
        if self.model is not None:
            check_optimizer_holds(self.model, params, every_trainable=False)
        trainable = [p for p in params if p.requires_grad]
        check_not_held([trainable])
        if self.split is not None:
            check_split_options(self.optimizer, [trainable], False, True)
        self.optimizer.add_param_group({**param_group, "params": []})  # checks the options
        self._masters.add_group(params, self.optimizer.param_groups[-1])
        self._changed_params()

    def _changed_params(self) -> None:
        """After masters were added: caches made again, fp32 grads only when a step needs them."""
        self._buffers = None  # the masters may now span another device
        self.update.invalidate()
        if self.update.fused:
            self._masters.release_master_grads()
        self._masters.mark_clean()

    def take_unfrozen_(self) -> list[torch.Tensor]:
        """Give masters to the parameters unfrozen since the optimizer was built, from their
        current values, in the param group they were in (flat: a group that had none gets its
        flat master; a flat group only partly unfrozen is refused, changing nothing); return
        them. `step()` and `unscale_()` call it; a caller that kept their exact fp32 values
        (the Learner) loads those next, with `load_master_values_`."""
        taken = self._masters.unfrozen()  # checked before anything changes
        if taken:
            check_not_held([taken])
            self._masters.take_unfrozen_(self.optimizer.state)
            let_go(self)
            hold(self)
            self._changed_params()
        return taken

    # -- the layout: a half model, its fp32 masters (see OptimizerWrapper.step) -------------
    def _is_data_parallel(self) -> bool:
        return self.data_parallel and is_data_parallel(self.process_group)

    def _between_backwards(self) -> None:
        # Accumulating: keep the earlier micro-batches' sum in fp32. Under data parallelism
        # the grads stay in the model for the backward that reduces them (DDP's no_sync()).
        if not self._is_data_parallel():
            self._masters.move_grads_(accumulate=self._state is StepState.ACCUMULATING)
            self._state = StepState.ACCUMULATING

    def _notice_gradients(self) -> None:
        self.take_unfrozen_()
        super()._notice_gradients()

    def _has_new_grads(self) -> bool:
        return self._masters.has_model_grads()

    def _params_with_grads(self) -> list[torch.Tensor]:
        return [p for group in self.model_params for p in group if p.grad is not None]

    def _unscale_into_fp32(self, scale: float) -> torch.Tensor | None:
        inv = 1.0 / scale
        buffers = self._step_buffers()
        if self.split is None and self._state is StepState.BACKWARD and buffers is not None:
            # The common case, one backward per step: cast, unscale and check in one sweep.
            found_inf, inv_scale, _ = buffers
            found_inf.zero_()
            inv_scale.fill_(inv)
            with torch.no_grad():
                copy_unscale_check_(
                    self._masters.grad_chunks(), found_inf, inv_scale, zero_src=self.flat_master
                )
            if not self.flat_master:
                self._masters.zero_model_grads()
            return found_inf
        self._masters.move_grads_(accumulate=self._state is StepState.ACCUMULATING)
        return unscale_and_check_(self._masters.master_grads(), inv)

    def _fp32_grads(self) -> list[torch.Tensor]:
        return self._masters.master_grads()

    def _clip_holders(self) -> list[torch.Tensor]:
        if self.split is not None:
            return self.split.clip_proxies()
        return [m for group in self.master_params for m in group]

    def _half_items(self) -> Sequence[Sequence[FusedItem]]:
        return self._masters.fused_items(from_master_grads=False)

    def _fp32_items(self) -> Sequence[Sequence[FusedItem]]:
        return self._masters.fused_items(from_master_grads=True)

    def _copy_to_model(self) -> None:
        self._masters.copy_to_model()

    def _zeroes_read_grads(self) -> bool:
        return self.flat_master

    def _after_fused_step(self, overflow: bool) -> None:
        if overflow or not self.flat_master:
            self._masters.zero_model_grads()

    def _after_step(self) -> None:
        # the model grads are zeroed (flat) or None, ready for the next backward
        if self.split is not None:
            self.split.drop_acc()
        if self._lean and self._state is StepState.UNSCALED:  # the one-pass step made none
            self._masters.release_master_grads()
        self._masters.mark_clean()

    def _zero_grads(self, set_to_none: bool) -> None:
        self._masters.zero_model_grads(set_to_none)
        if self.split is not None:
            self.split.drop_acc()
        if self._lean and self._state in (StepState.ACCUMULATING, StepState.UNSCALED):
            self._masters.release_master_grads()  # fused=True keeps no fp32 grads between steps
        self._masters.mark_clean()

    def _after_failed_step(self) -> None:
        """After an exception inside the update: no half-made optimizer state survives (a
        first step's lazily created moments), the model holds its masters again, and the next
        backward starts a new step. The step is not counted."""
        drop_incomplete_state_(self.optimizer)
        self.update.invalidate()
        self._masters.copy_to_model()
        self.zero_grad()

    def _overflow_report(self, from_model_grads: bool) -> forensics.OverflowReport:
        """The report of the step being skipped, from the master gradients (or, with
        `from_model_grads`, the model's half gradients)."""
        report = forensics.overflow_report(
            self._masters.named_grads(from_model_grads), self.scaler.steps, self.scaler.scale
        )
        weights = forensics.weight_faults(self._masters.named_weights())
        return dataclasses.replace(report, weights=weights) if weights else report

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """fp32 masters, the wrapped optimizer's state and the scaler's state (references;
        split masters: rebuilt fp32 copies, the same layout as the fp32 path's)."""
        masters = (
            self.split.masters()
            if self.split is not None
            else [[m.detach() for m in group] for group in self.master_params]
        )
        return {
            "mode": "master",
            "masters": masters,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": optimizer_type_name(self.optimizer),
            "scaler": self.scaler.state_dict(),
            "flat_master": self.flat_master,
        }

    def check_state_dict(self, state_dict: Any) -> list[list[torch.Tensor]]:
        """Raise a ValueError (TypeError for a non-mapping) naming what in `state_dict` this
        optimizer cannot take: mode, flat layout, masters' shapes and dtypes, the wrapped
        optimizer's type, groups and per-parameter state, the scaler's state. Changes
        nothing; returns the saved masters."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "expected a MixedPrecisionOptimizer state_dict (from opt.state_dict()); got "
                f"{type(state_dict).__name__}."
            )
        saved = check_saved_masters(state_dict, self.master_params, self.flat_master)
        check_optimizer_state_dict(
            self.optimizer,
            state_dict["optimizer"],
            self.master_params,
            state_dict.get("optimizer_type"),
        )
        copy.deepcopy(self.scaler).load_state_dict(state_dict["scaler"])
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore masters, optimizer and scaler state, and copy the masters into the model;
        all of it or, if `state_dict` does not fit (see `check_state_dict`), none of it."""
        saved = self.check_state_dict(state_dict)
        with deferred_interrupt():
            load_optimizer_state_dict(self.optimizer, state_dict["optimizer"])
            self.scaler.load_state_dict(state_dict["scaler"])
            if self.split is not None:
                self._keep_state_fp32(state_dict["optimizer"])
                self.split.load_(saved)  # bf16 weights and low bits from the fp32 masters
            else:
                with torch.no_grad():
                    torch._foreach_copy_(
                        [m for group in self.master_params for m in group],
                        [m for group in saved for m in group],
                    )
                self._masters.copy_to_model()
            self.zero_grad()
            self.update.invalidate()
        self._warn_weights_beyond_half()

    def _warn_weights_beyond_half(self) -> None:
        """An fp16 model: warn (RuntimeWarning) naming the parameters whose loaded masters lie
        beyond fp16's range, which the half model now holds as inf (one pass, one sync: loads
        only; during training the next step that uses such a weight overflows and names it)."""
        if self.dtype != torch.float16:
            return
        found = forensics.weight_faults(self._masters.named_weights(), warn=False)
        if found:
            warnings.warn(
                "loaded masters the float16 model cannot hold: "
                f"{', '.join(map(str, found[: forensics.SHOWN]))}. The forward will overflow "
                "there; keep these layers in fp32 (PrecisionPolicy), or train in bfloat16.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _keep_state_fp32(self, saved: Mapping[str, Any]) -> None:
        """torch's load_state_dict casts state to each parameter's dtype (bf16 here): put the
        saved fp32 moments back."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entries in saved.get("state", {}).items():
            st = self.optimizer.state[params[int(index)]]
            for k, v in entries.items():
                if torch.is_tensor(v) and v.is_floating_point() and v.dim() and k in st:
                    st[k] = v.detach().to(st[k].device, torch.float32, copy=True)

    def __repr__(self) -> str:
        return (
            f"MixedPrecisionOptimizer({self.optimizer.__class__.__name__}, "
            f"scaler={self.scaler!r}, flat_master={self.flat_master}, clip={self.clip}, "
            f"fused={self.fused}, master={'split' if self.split is not None else 'fp32'!r})"
        )

    def remove_params(self, params: Iterable[torch.Tensor]) -> None:
        """Stop stepping the model parameters `params` (say, of a module replaced in the
        model): they leave their param groups (emptied groups stay), with their masters and
        optimizer state; the other parameters keep theirs, flat masters included. Checked,
        and new flat masters made, before anything changes: each must be held, and no step
        may be under way."""
        params = list(params)
        held = [*self.model_params, *self.frozen_params]
        check_held({id(p) for g in held for p in g}, params)
        if self._state is not StepState.READY:
            raise RuntimeError(
                "remove_params() between backward() and step(): call step() or zero_grad() first."
            )
        with deferred_interrupt():
            self._masters.remove_(params, self.optimizer.state)
            for p in params:
                self.param_names.pop(p, None)
            self._changed_params()
