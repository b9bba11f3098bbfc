"""MixedPrecisionOptimizer: any torch optimizer stepping fp32 masters of a half model."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mixprec.core.checks import (
    check_engine_options,
    check_flag,
    check_optimizer_supported,
    check_param_group,
)
from mixprec.core.chunked import (
    copy_unscale_check_,
)
from mixprec.core.convert import model_to_half, restore_fp32_
from mixprec.core.flat_group import FlatGroup
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.master import (
    check_master_params,
    flatten_like,
    make_masters,
    master_views,
    masters_by_param,
    new_group_params,
)
from mixprec.core.master_state import check_saved_masters, move_state_to_masters
from mixprec.core.optim_state import (
    check_held,
    check_optimizer_state_dict,
    drop_incomplete_state_,
    optimizer_type_name,
)
from mixprec.core.policy import PrecisionPolicy, Rule
from mixprec.core.scaler import LossScale, LossScaler, unscale_and_check_
from mixprec.engine import forensics
from mixprec.engine.conversion import conversion
from mixprec.engine.fused_adam import (
    FusedAdamStep,
    fused_unsupported_reason,
    step_from_master_grads_,
)
from mixprec.engine.holders import check_not_held, hold, let_go
from mixprec.engine.master_set import MasterSet
from mixprec.engine.split_master import SplitMasters, check_split_options
from mixprec.engine.telemetry import NO_TELEMETRY
from mixprec.engine.view_step import ViewStep
from mixprec.engine.wrapper import OptimizerWrapper, enable_step_hooks
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
        clip = check_engine_options(clip, data_parallel)
        check_flag("flat_master", flat_master)
        check_flag("fused", fused, none_ok=True)
        if master not in ("fp32", "split"):
            raise ValueError(f'master must be "fp32" or "split"; got {master!r}.')
        check_optimizer_supported(optimizer, model if isinstance(model, nn.Module) else None)
        model_params = [list(group["params"]) for group in optimizer.param_groups]
        check_master_params(model_params, bool(flat_master))
        check_not_held(model_params)
        self.dtype, policy = conversion(model_params, model, dtype, keep_fp32)
        if master == "split":
            if policy is not None and self.dtype != torch.bfloat16:
                raise ValueError(
                    'MixedPrecisionOptimizer(..., master="split") stores masters as bf16 '
                    f"weights plus 16 low bits; the model would be converted to {self.dtype}. Pass "
                    'dtype=torch.bfloat16, or use master="fp32".'
                )
            check_split_options(optimizer, model_params, bool(flat_master), fused)
        self.param_names = {} if model is None else forensics.param_names(model, model_params)
        self.scaler = LossScaler(loss_scale, **scaler_options)
        # fused=None: the fastest correct path for this optimizer. Asked for explicitly, the
        # fused path also frees the fp32 master grads it had to make (16 B/param).
        self._lean = fused is True
        self._auto_fused = fused is None and master != "split"  # split needs the fused step
        if fused is None:
            fused = fused_unsupported_reason(optimizer) is None
        self._fused = FusedAdamStep(optimizer) if fused else None  # validates the optimizer
        self.optimizer = optimizer
        self.flat_master = bool(flat_master)
        self.clip = clip
        self.process_group = process_group
        self.data_parallel = data_parallel
        self.model_params = model_params
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
        )
        if self._fused is not None:
            self._masters.release_master_grads()  # made again only when a step needs them
        # element-wise optimizers step large masters through cache-sized views: same numbers
        self._view_step = ViewStep(optimizer) if ViewStep.supported(optimizer) else None
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self.telemetry = NO_TELEMETRY  # or a mixprec.Telemetry: per-step records, no host sync
        self._pending = False  # model grads hold gradients not yet moved to the masters
        self._accumulated = False  # master grads hold gradients of this step
        self._found_inf: torch.Tensor | None = None  # set by unscale_(), consumed by step()
        self.last_overflow: forensics.OverflowReport | None = None  # of the last skipped step
        self._released = False
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
        """Add a group of model parameters; the wrapped optimizer gets their fp32 masters."""
        check_param_group(param_group)
        params = new_group_params(param_group["params"], self.model_params)
        check_not_held([params])
        if self.split is not None:
            check_split_options(self.optimizer, [params], False, True)
            self.split.add_group(params)
            masters = list(params)
        else:
            (masters,) = make_masters([params], self.flat_master)
        if self.flat_master and params:
            self._flat_groups.append(FlatGroup(params, masters[0]))
        self.optimizer.add_param_group({**param_group, "params": masters})
        self.model_params.append(params)
        self.master_params.append(masters)
        self._buffers = None  # the masters may now span another device
        if self._fused is not None:
            self._masters.release_master_grads()  # as at construction: made when a step needs them

    # -- the mixed-precision loop -----------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the fp32 loss times the loss scale, ready for `.backward()`."""
        if self._found_inf is not None:
            raise RuntimeError(
                "unscale_() was already called for this step; call step() before the next "
                "backward. Expected order: backward(loss) [x N], unscale_() (optional), step()."
            )
        if self._pending and not self._is_data_parallel():
            self._move_grads_to_masters()  # accumulating: keep earlier micro-batches' sum in fp32
        self._pending = True
        return self.scaler.scale_loss(loss)

    def backward(self, loss: torch.Tensor, **backward_kwargs: Any) -> None:
        """Backward of the scaled loss; several calls before `step()` accumulate in fp32."""
        self.scale_loss(loss).backward(**backward_kwargs)

    def unscale_(self) -> None:
        """Move the gradients into the fp32 masters, unscale them, check them for inf/nan and
        clip them; `step()` does this itself when it was not called. No host sync."""
        with deferred_interrupt():  # the grads moved and the flags set together, or neither
            self._unscale()

    def _unscale(self) -> None:
        if self._found_inf is not None:
            raise RuntimeError(
                "unscale_() has already been called since the last step(); call step() next."
            )
        if not (self._pending or self._accumulated):
            raise RuntimeError(
                "no gradients to step on: call backward(loss) (or .backward() on "
                "scale_loss(loss)) before unscale_() or step()."
            )
        buffers = self._step_buffers()
        if self.split is not None:
            self.split.accumulate_()  # the fp32 grads of this step
            self._pending, self._accumulated = False, True
            found_inf = unscale_and_check_(self.split.acc_grads(), 1.0 / self.scaler.scale)
            if found_inf is None:
                found_inf = torch.zeros(1, device=self._device())
        elif self._pending and not self._accumulated and buffers is not None:
            # The common case, one backward per step: cast, unscale and check in one sweep.
            found_inf, inv_scale, _ = buffers
            found_inf.zero_()
            inv_scale.fill_(1.0 / self.scaler.scale)
            with torch.no_grad():
                copy_unscale_check_(
                    self._masters.grad_chunks(), found_inf, inv_scale, zero_src=self.flat_master
                )
            if not self.flat_master:
                self._masters.zero_model_grads()
            self._pending, self._accumulated = False, True
        else:
            if self._pending:
                self._move_grads_to_masters()
            grads = [m.grad for group in self.master_params for m in group if m.grad is not None]
            found_inf = unscale_and_check_(grads, 1.0 / self.scaler.scale)
            if found_inf is None:
                found_inf = torch.zeros(1, device=self._device())
        self._all_reduce_overflow(found_inf)
        self.telemetry.record_(
            found_inf, self.scaler.scale, self._masters.master_grads
        )  # before clip
        if self.clip is not None:
            masters = (
                self.split.clip_proxies()
                if self.split is not None
                else [m for group in self.master_params for m in group]
            )
            self.last_grad_norm = forensics.clip_grad_norm_if_finite_(masters, self.clip)
        self._found_inf = found_inf

    def step(self, closure: Callable[[], float] | None = None) -> bool:  # type: ignore[override]
        """Apply the step unless the gradients overflowed; return whether it was applied."""
        if closure is not None:
            raise TypeError(
                "MixedPrecisionOptimizer.step() takes no closure: compute the loss, call "
                "backward(loss), then step()."
            )
        if self._released:
            raise RuntimeError(
                "this MixedPrecisionOptimizer was released (release()): its parameters may be "
                "held by another wrapper now; step that one."
            )
        # A critical section: a Ctrl-C in here is raised once the masters, the model and the
        # scaler agree again (see mixprec.core.interrupts).
        with deferred_interrupt():
            return self._step()

    def _step(self) -> bool:
        if self._found_inf is None:
            if (
                self._pending
                and not self._accumulated
                and self._can_fuse()
                and self._step_buffers() is not None
            ):
                return self._fused_step()
            self._unscale()
        assert self._found_inf is not None
        overflow = bool(self._found_inf.item())  # the one host sync of the step
        self._found_inf = None
        if overflow:  # only now: forensics cost nothing on clean steps
            self.last_overflow = self._overflow_report(from_model_grads=False)
        if not overflow:
            try:
                if self.split is not None or self._can_fuse():
                    items = self._masters.fused_items(from_master_grads=True)
                    assert self._fused is not None
                    with torch.no_grad():  # the wrapped step and the copy to the model, in cache
                        step_from_master_grads_(self._fused, items)
                    self._stepped_fused()
                else:
                    (self.optimizer if self._view_step is None else self._view_step).step()
                    self._masters.copy_to_model()
            except BaseException:  # raised inside the inner step (a hook, out of memory)
                self._after_failed_step()
                raise
        # unscale_() left the model grads zeroed (flat) or None, ready for the next backward.
        if self.split is not None:
            self.split.drop_acc()
        if self._lean:
            self._masters.release_master_grads()
        self._pending = self._accumulated = False
        return self._update_scale(overflow)

    def _fused_step(self) -> bool:
        """Check, unscale, clip and Adam(W)-step the masters from the half gradients."""
        items = self._masters.fused_items(from_master_grads=False)
        with torch.no_grad():
            overflow = self._run_fused(items, self.flat_master)
            if overflow:  # read the half grads before they are zeroed
                self.last_overflow = self._overflow_report(from_model_grads=True)
            if overflow or not self.flat_master:
                self._masters.zero_model_grads()
        self._pending = self._accumulated = False
        return self._update_scale(overflow)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients of the current step, in the model and the masters."""
        self._masters.zero_model_grads(set_to_none)
        if self.split is not None:
            self.split.drop_acc()
        if self._lean and self._accumulated:
            self._masters.release_master_grads()  # fused=True keeps no fp32 grads between steps
        self._pending = self._accumulated = False
        self._found_inf = None

    # -- internals ----------------------------------------------------------------------------
    def _after_failed_step(self) -> None:
        """After an exception inside the inner step: no half-made optimizer state survives
        (a first step's lazily created moments), the model holds its masters again, and the
        next backward starts a new step. The step is not counted."""
        drop_incomplete_state_(self.optimizer)
        if self._fused is not None:
            self._fused.invalidate()
        self._masters.copy_to_model()
        self.zero_grad()

    def _move_grads_to_masters(self) -> None:
        """Model grads -> master grads (copy on the first micro-batch, add after), then zero
        the model grads."""
        self._masters.move_grads_(accumulate=self._accumulated)
        self._pending = False
        self._accumulated = True

    def _is_data_parallel(self) -> bool:
        return self.data_parallel and is_data_parallel(self.process_group)

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
            self.optimizer.load_state_dict(state_dict["optimizer"])
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
            if self._fused is not None:
                self._fused.invalidate()

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
        check_held({id(p) for g in self.model_params for p in g}, params)
        if self._pending or self._accumulated or self._found_inf is not None:
            raise RuntimeError(
                "remove_params() between backward() and step(): call step() or zero_grad() "
                "first."
            )
        drop = {id(p) for p in params}
        state = self.optimizer.state
        changes = []  # (group, kept params, their masters, a new flat master's state)
        with torch.no_grad():
            for i, (ps, ms) in enumerate(zip(self.model_params, self.master_params)):
                if not any(id(p) in drop for p in ps):
                    continue
                keep = [j for j, p in enumerate(ps) if id(p) not in drop]
                kept = [ps[j] for j in keep]
                if not self.flat_master:
                    changes.append((i, kept, [ms[j] for j in keep], None))
                    continue
                if not kept:
                    changes.append((i, kept, [], None))
                    continue
                old = ms[0]
                master = nn.Parameter(
                    flatten_like([master_views(ps, ms, True)[j] for j in keep], kept, old.device)
                )
                master.grad = torch.zeros_like(master)  # as make_masters leaves it
                cut = {  # per-element entries cut to the kept parameters, per-tensor ones kept
                    k: flatten_like([master_views(ps, [v], True)[j] for j in keep], kept, v.device)
                    if torch.is_tensor(v) and v.shape == old.shape
                    else v
                    for k, v in state.get(old, {}).items()
                }
                changes.append((i, kept, [master], cut))
        with deferred_interrupt(), torch.no_grad():
            for i, kept, masters, cut in changes:
                ps, ms = self.model_params[i], self.master_params[i]
                if self.flat_master:
                    at = next(k for k, fg in enumerate(self._flat_groups) if fg.master is ms[0])
                    del self._flat_groups[at]
                    if kept:
                        self._flat_groups.insert(at, FlatGroup(kept, masters[0]))
                        if cut:
                            state[masters[0]] = cut
                    for p in ps:  # removed ones: out of the flat buffers, on their own storage
                        if id(p) in drop:
                            p.data, p.grad = p.data.clone(), None
                if self.split is not None:  # its masters are the parameters themselves
                    self.split.remove([p for p in ps if id(p) in drop])
                kept_masters = set(map(id, masters))
                for m in ms:
                    if id(m) not in kept_masters:
                        state.pop(m, None)
                self.model_params[i] = kept
                self.master_params[i] = masters
                self.optimizer.param_groups[i]["params"] = list(masters)
            for p in params:
                self.param_names.pop(p, None)
            self._buffers = None
            if self._fused is not None:
                self._fused.invalidate()
                self._masters.release_master_grads()
