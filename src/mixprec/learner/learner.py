"""`Learner`: a small fastai-v1-style training loop over a model, a `DataBunch` and callbacks."""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mixprec.core.checks import (
    check_module,
    check_not_half_without_masters,
    check_optimizer_holds,
    check_optimizer_supported,
    check_trainable,
    held_params,
    real_number,
)
from mixprec.core.convert import cast_floats, input_dtype, model_to_float
from mixprec.core.dtypes import HALF_DTYPES
from mixprec.core.interrupts import deferred_interrupt
from mixprec.core.optim_state import drop_incomplete_state_, remove_params_
from mixprec.core.scaler import LossScale
from mixprec.learner.accumulation import check_accumulate, micro_batches, steps_per_epoch
from mixprec.learner.callback import Callback, CallbackHandler
from mixprec.learner.checkpoints import load_learner_, save_learner
from mixprec.learner.checks import (
    check_class_dim,
    check_learner_options,
    check_loss,
    check_metrics,
    check_metrics_on,
)
from mixprec.learner.compat import checkpoint_file_name
from mixprec.learner.data import (
    DataBunch,
    DeviceDataLoader,
    batch_size,
    loader_length,
    to_device,
)
from mixprec.learner.layer_groups import freeze_to, split_params
from mixprec.learner.lr_finder import LearnerSnapshot, LRFinder, LRFinderResult
from mixprec.learner.mixed_precision import MixedPrecision
from mixprec.learner.model_output import call_model
from mixprec.learner.ranks import Ranks, set_epoch
from mixprec.learner.recorder import Recorder
from mixprec.learner.schedule import OneCycleScheduler, set_lr
from mixprec.parallel.distributed import no_sync

__all__ = ["DEFAULT_LR", "Learner"]

DEFAULT_LR = 3e-3

OptFunc = Callable[..., torch.optim.Optimizer]
Metric = Callable[[torch.Tensor, torch.Tensor], Any]


class Learner:
    """Trains `model` on `data` with `opt_func(param_groups, lr=lr)`, `loss_func` and callbacks.

    The optimizer is built once (at the first `fit`, or by `to_fp16`) over every parameter of
    `layer_groups` (default `[model]`), frozen or not, and kept: its state carries across
    `fit()` calls and frozen parameters (no grad) are left alone. Each layer group gives three
    param groups, in order: weights, biases and norm-layer parameters; the last two get no
    weight decay unless `bn_wd`. `wd` (if not None) sets the weights' decay.

    `accumulate=N` sums the gradients of N micro-batches (each loss divided by N) before each
    optimizer step, as one N-times-larger batch would; under torchrun DDP reduces them once,
    in the step's last backward (`no_sync` for the others).

    A dict batch input (`input_ids`, `attention_mask`, ...) is passed as `model(**x)`.

    Checkpoints go to `path / model_dir / f"{name}.pth"`. Under torchrun: data parallel (`Ranks`).
    """

    def __init__(
        self,
        data: DataBunch,
        model: nn.Module,
        opt_func: OptFunc = torch.optim.AdamW,
        loss_func: Callable[..., torch.Tensor] = F.cross_entropy,
        metrics: Sequence[Metric] | Metric = (),
        layer_groups: Sequence[nn.Module] | None = None,
        callbacks: Iterable[Callback] | Callback = (),
        *,
        wd: float | None = None,
        bn_wd: bool = False,
        path: str | os.PathLike = ".",
        model_dir: str = "models",
        progress: bool = True,
        distributed: bool = True,
        accumulate: int = 1,
    ) -> None:
        if not isinstance(data, DataBunch):
            raise TypeError(
                f"data must be a DataBunch; got {type(data).__name__}. "
                "Wrap your loaders: DataBunch(train_dl, valid_dl)."
            )
        check_module(model)
        check_learner_options(opt_func, loss_func, wd, path, model_dir)
        self.ranks = Ranks(distributed)  # first: under NCCL it picks this rank's GPU
        self.data = data
        self.model = model.to(data.device)
        self.ranks.setup_(data, self.model)
        self.opt_func = opt_func
        self.loss_func = loss_func
        self.metrics = check_metrics(metrics)
        self.layer_groups = list(layer_groups) if layer_groups is not None else [model]
        for group in self.layer_groups:
            if not isinstance(group, nn.Module):
                raise TypeError(f"layer_groups must hold nn.Modules; got {type(group).__name__}.")
        self.callbacks: list[Callback] = []
        for cb in [callbacks] if isinstance(callbacks, Callback) else callbacks:
            self.add_cb(cb)
        self.wd = None if wd is None else real_number(wd)
        self.bn_wd = bool(bn_wd)
        self.path = Path(path)
        self.model_dir = model_dir
        self.progress = bool(progress)
        self.accumulate = check_accumulate(accumulate)
        self.opt: torch.optim.Optimizer | None = None
        # The parameters this learner gave its optimizer, or trained as the model's: one held
        # that has left the model was replaced in it (and leaves the optimizer at the next fit).
        self._known: dict[int, weakref.ref] = {}
        self.recorder = Recorder()
        self.epoch = 0  # epochs trained, over every fit()
        self.iteration = 0  # steps trained (applied or skipped), over every fit()

    # -- the optimizer -------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Three param groups per layer group: weights, biases, norm-layer parameters."""
        no_decay = {} if self.bn_wd else {"weight_decay": 0.0}
        decay = {} if self.wd is None else {"weight_decay": float(self.wd)}
        groups = []
        for weights, biases, norms in split_params(self.layer_groups):
            groups.append({"params": weights, **decay})
            groups.append({"params": biases, **(decay if self.bn_wd else no_decay)})
            groups.append({"params": norms, **(decay if self.bn_wd else no_decay)})
        return groups

    def create_opt(self, lr: float = DEFAULT_LR) -> torch.optim.Optimizer:
        """Build `self.opt` afresh with `opt_func(self.param_groups(), lr=lr)`."""
        opt = self._build_opt(lr)
        self.opt = opt
        return opt

    def _build_opt(self, lr: float = DEFAULT_LR) -> torch.optim.Optimizer:
        """`opt_func(self.param_groups(), lr=lr)`, checked; `self.opt` is left alone."""
        if isinstance(self.opt_func, type):  # LBFGS would fail on the groups, unexplained
            check_optimizer_supported(self.opt_func)
        groups = self.param_groups()
        opt = self.opt_func(groups, lr=lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "opt_func(param_groups, lr=lr) must return a torch.optim.Optimizer; got "
                f"{type(opt).__name__}."
            )
        self._remember(p for g in groups for p in g["params"])
        return opt

    def _remember(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            self._known[id(p)] = weakref.ref(p)

    def _replaced(self, p: torch.Tensor) -> bool:
        """Whether `p` is a parameter this learner trained that has left the model."""
        ref = self._known.get(id(p))
        return ref is not None and ref() is p

    def add_new_params(self) -> int:
        """Bring the optimizer up to date with the model: the parameters it holds that are no
        longer the model's (a replaced module's) leave it with their state, and the layer
        groups' parameters it does not hold yet join it in new param groups (under mixed
        precision with masters); return how many joined."""
        if self.opt is None:
            return 0
        stale, fresh = self._param_changes()
        if stale:
            if hasattr(self.opt, "remove_params"):  # a mixprec wrapper: masters, state too
                self.opt.remove_params(stale)
            else:
                remove_params_(self.opt, stale)
        for group in fresh:
            self.opt.add_param_group(group)
            self._remember(group["params"])
        return sum(len(group["params"]) for group in fresh)

    def _update_opt(self) -> None:
        """What the start of `fit` does to an existing optimizer of a changed model, now:
        refused before anything changes, or (under mixed precision with the new modules
        converted) the replaced parameters out and the new ones in."""
        if self.opt is None:
            return
        self._param_changes()
        mp = self.mixed_precision
        if mp is not None:
            mp.prepare()  # converts the new modules, then add_new_params()
        else:
            self.add_new_params()

    def _drop_replaced_params(self) -> Callable[[], None]:
        """Take the parameters of modules replaced in the model out of a plain torch
        optimizer (as `add_new_params` does), checked first; return what puts them back."""
        opt = self.opt
        if opt is None or hasattr(opt, "scaler"):  # none yet, or a mixprec wrapper
            return lambda: None
        stale, _ = self._param_changes(every_trainable=False)  # fit() checks the rest
        groups = [list(g["params"]) for g in opt.param_groups]
        state = {p: opt.state[p] for p in stale if p in opt.state}
        remove_params_(opt, stale)

        def undo() -> None:
            for group, params in zip(opt.param_groups, groups):
                group["params"] = params
            opt.state.update(state)

        return undo

    def _param_changes(
        self, every_trainable: bool = True
    ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """(the held parameters of modules replaced in the model, the param groups of the
        layer groups' parameters the optimizer does not hold), checked: the optimizer would
        then hold only the model's parameters (and, with `every_trainable`, all of its
        trainable ones)."""
        held = held_params(self.opt)
        ours = {id(p) for p in self.model.parameters()}
        stale = [p for p in held if id(p) not in ours and self._replaced(p)]
        unknown = [p for p in held if id(p) in ours or not self._replaced(p)]
        check_optimizer_holds(self.model, unknown, every_trainable=False)  # another model's
        held_ids = {id(p) for p in held}
        fresh = []
        for group in self.param_groups():
            params = [p for p in group["params"] if id(p) not in held_ids]
            if params:
                fresh.append({**group, "params": params})
        after = [p for p in held if id(p) in ours] + [p for g in fresh for p in g["params"]]
        try:
            check_optimizer_holds(self.model, after, every_trainable=every_trainable)
        except ValueError as e:
            raise ValueError(
                f"{e} The optimizer steps the parameters of learn.layer_groups; after a module "
                "of the model was replaced or added, set learn.layer_groups again so that they "
                "cover the model as it is now (e.g. learn.layer_groups = [model[:3], "
                "model[3:]]), or leave them at the default, the whole model."
            ) from None
        return stale, fresh

    def _set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)

    # -- training ------------------------------------------------------------------------
    def fit(
        self, epochs: int, lr: float = DEFAULT_LR, *, callbacks: Iterable[Callback] = ()
    ) -> None:
        """Train for `epochs` epochs at learning rate `lr` (0 is allowed), validating after
        each; `callbacks` join `self.callbacks` for this fit only. A callback's `on_batch_end`
        or `on_epoch_end` returning True stops training (after that step's epoch is validated)."""
        self._fit(epochs, lr, list(callbacks), validate=True)

    def fit_one_cycle(
        self,
        epochs: int,
        max_lr: float = DEFAULT_LR,
        *,
        div: float = 25.0,
        pct_start: float = 0.3,
        final_div: float | None = None,
        moms: tuple[float, float] | None = (0.95, 0.85),
        callbacks: Iterable[Callback] = (),
    ) -> None:
        """Train with fastai v1's one-cycle policy (`OneCycleScheduler`): the lr rises from
        `max_lr / div` to `max_lr` over the first `pct_start` of the steps and falls to
        `max_lr / final_div` (default `div * 1e4`), both along a cosine, while the momentum
        (Adam's beta1, SGD's momentum) goes from `moms[0]` to `moms[1]` and back."""
        self._check_epochs(epochs)
        n_batches = loader_length(self.data.train_dl)
        if n_batches is None:
            raise ValueError(
                "fit_one_cycle needs the number of steps: the training loader has no len(). "
                "Give the dataset a __len__, or use fit() with your own scheduling callback."
            )
        total = epochs * steps_per_epoch(n_batches, self.accumulate)
        sched = OneCycleScheduler(
            max_lr, total, div=div, pct_start=pct_start, final_div=final_div, moms=moms
        )
        self._fit(epochs, sched.lr(0), [sched, *callbacks], validate=True)

    def lr_find(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        stop_div: bool = True,
    ) -> LRFinderResult:
        """Train `num_it` steps with the lr rising exponentially from `start_lr` to `end_lr`
        (stopping early once the loss diverges), without validating; then put model, masters,
        optimizer, scaler, history, counts and random state back exactly as they were.
        Returns the sweep: `.lrs`, `.losses`, `.suggestion`, `.plot(path)`."""
        finder = LRFinder(start_lr, end_lr, num_it, stop_div)
        n_batches = loader_length(self.data.train_dl)
        per_epoch = num_it if not n_batches else steps_per_epoch(n_batches, self.accumulate)
        self._update_opt()  # a changed model's parameters, before the snapshot of the optimizer
        snapshot = LearnerSnapshot(self)
        try:
            self._fit(-(-num_it // per_epoch), start_lr, [finder], validate=False)
        except FloatingPointError:  # the scaler gave up at high lrs: the sweep ends there
            pass
        finally:
            snapshot.restore()
        return finder.result()

    @staticmethod
    def _check_epochs(epochs: Any) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1; got {epochs!r}.")

    def _fit(self, epochs: int, lr: float, extra: list[Callback], validate: bool) -> None:
        self._check_epochs(epochs)
        number = real_number(lr)
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"lr must be a finite number >= 0; got {lr!r}.")
        lr = number
        for cb in extra:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be Callback instances; got {type(cb).__name__}. "
                    "Subclass mixprec.Callback and pass an instance."
                )
        check_trainable(self.model)
        if self.mixed_precision is None:
            check_not_half_without_masters(self.model)
        if self.opt is None:
            self.create_opt(lr)
        self.opt.zero_grad()  # drop what a step interrupted in an earlier fit() left behind
        drop_incomplete_state_(getattr(self.opt, "optimizer", self.opt))
        self._param_changes()  # a model changed beyond its layer groups: refused, nothing done
        self._set_lr(lr)
        handler = CallbackHandler(
            [self.recorder, *self.callbacks, *extra],
            learn=self,
            n_epochs=epochs,
            lr_find=any(isinstance(cb, LRFinder) for cb in extra),  # trackers sit it out
        )
        grad_mode = torch.is_grad_enabled()
        exception: BaseException | None = None
        self._first_batch = True  # its loss (and metrics, if validated) are checked
        self._check_metrics = validate and self.data.valid_dl is not None and bool(self.metrics)
        try:
            handler("on_train_begin")
            self.add_new_params()
            check_optimizer_holds(self.model, held_params(self.opt))
            self._remember(held_params(self.opt))  # the model's, as checked just above
            self._set_lr(lr)  # a scheduling callback sets each step's lr at on_batch_begin
            with self.ranks.training(self.model, self.opt):  # DDP under torchrun
                for k in range(epochs):
                    if self._fit_epoch(handler, f"epoch {k + 1}/{epochs}", validate):
                        break
        except BaseException as e:  # KeyboardInterrupt too: on_train_end must still run
            exception = e
            raise
        finally:
            # Clean-up runs whole: a second Ctrl-C waits until every on_train_end has run.
            # One that lands before the clean-up's region is entered is held until it ran.
            entered = False
            try:
                with deferred_interrupt():
                    entered = True
                    torch.set_grad_enabled(grad_mode)  # a stop inside a no_grad region
                    handler("on_train_end", exception=exception)
            except KeyboardInterrupt:
                if not entered:
                    with deferred_interrupt():
                        torch.set_grad_enabled(grad_mode)
                        handler("on_train_end", exception=exception)
                raise

    def _fit_epoch(self, handler: CallbackHandler, desc: str, validate: bool) -> bool:
        """One epoch; returns whether a callback asked to stop training."""
        model = self.ranks.train_module(self.model)  # DDP under torchrun
        self.model.train()
        handler("on_epoch_begin", epoch=self.epoch, train=True)
        dl = self.data.train_dl
        set_epoch(dl.dl, self.epoch)  # a DistributedSampler reshuffles per epoch
        off = None if self.progress and self.ranks.is_main else True
        stop = False
        step_loss: torch.Tensor | None = None  # the mean of the step's micro-batch losses
        with tqdm(total=loader_length(dl), desc=desc, leave=False, disable=off) as pbar:
            batches = self.ranks.batches(dl, self.epoch)  # under torchrun, even on every rank
            for i, (x, y), group_size, ends_step in micro_batches(batches, self.accumulate):
                x, y = handler(
                    "on_batch_begin",
                    last_input=x,
                    last_target=y,
                    num_batch=i,
                    iteration=self.iteration,
                    step_applied=None,
                    pbar=pbar,
                )
                # DDP reduces the gradients once per step, in its last backward
                with no_sync(model, enabled=not ends_step):
                    with self.forward_context():  # entered and left here, even on an exception
                        output = handler("on_loss_begin", last_output=call_model(model, x))
                        raw_loss = self._loss(output, y)
                    loss = handler("on_backward_begin", last_loss=raw_loss)
                    (loss if group_size == 1 else loss / group_size).backward()
                if group_size > 1:
                    part = raw_loss.detach() / group_size
                    step_loss = part if step_loss is None else step_loss + part
                pbar.update()
                if not ends_step:
                    continue
                if group_size > 1:
                    handler.state["last_loss"], step_loss = step_loss, None
                handler("on_backward_end")
                with deferred_interrupt():  # a step is taken and counted, or neither
                    applied = self.opt.step() is not False  # plain optimizers return None
                    self.iteration += 1  # counted at once: a stop in the events below keeps it
                handler("on_step_end", step_applied=applied)
                self.opt.zero_grad()
                last_loss = self.ranks.mean(handler.state["last_loss"])
                if handler("on_batch_end", last_loss=last_loss):
                    stop = True
                    break
        self.ranks.end_epoch_(self.model)
        metrics = self.validate() if validate and self.data.valid_dl is not None else None
        self.epoch += 1  # before on_epoch_end: a checkpoint saved there counts this epoch
        return bool(handler("on_epoch_end", last_metrics=metrics, train=False)) or stop

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        """The loss; on the fit's first batch, loss and metrics are checked on this output."""
        if not self._first_batch:
            return self.loss_func(output, target)
        loss = check_loss(self.loss_func, output, target)
        if self._check_metrics:
            check_metrics_on(self.metrics, output, target)  # as validate() will call them
        self._first_batch = False
        return loss

    # -- evaluation ----------------------------------------------------------------------
    def validate(self, dl: Iterable | None = None) -> list[float]:
        """`[valid_loss, *metrics]` over `dl` (default: the validation loader), averaged
        over samples. Each batch goes through the callbacks' `on_batch_begin` and the output
        through their `on_loss_begin` (with `train=False`), as in training, so loss and
        metrics see what the training loss sees. Inputs are cast to the model's dtype,
        outputs to fp32. Under torchrun a collective: every rank calls it, evaluates its
        shard, and gets the total averages."""
        dl = self.data.valid_dl if dl is None else dl
        if dl is None:
            raise ValueError(
                "no validation data: build the DataBunch with a valid_dl or pass validate(dl)."
            )
        if not isinstance(dl, DeviceDataLoader):
            dl = DeviceDataLoader(dl, self.data.device, [])  # checks every batch is a pair
        grad_mode = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            return self._validate(dl)
        finally:
            torch.set_grad_enabled(grad_mode)

    def _validate(self, dl: Iterable) -> list[float]:
        dtype = input_dtype(self.model)
        was_training = self.model.training
        self.model.eval()
        # A DataLoader draws a seed from the global RNG per pass: validating must not shift
        # the shuffling of later epochs (fit(1); validate(); fit(1) == fit(2)).
        with torch.random.fork_rng(devices=[]), self.forward_context():
            try:
                totals, count = self._evaluate(dl, dtype)
            finally:
                self.model.train(was_training)
        totals, count = self.ranks.sum_totals(totals, count, 1 + len(self.metrics))
        if totals is None:
            raise ValueError("the validation loader yielded no batches.")
        return (totals / count).tolist()  # one host sync for the whole pass

    def _eval_handler(self) -> CallbackHandler:
        """The callbacks, for the events of evaluation (`on_batch_begin`, `on_loss_begin`)."""
        return CallbackHandler(
            self.callbacks,
            learn=self,
            train=False,
            epoch=self.epoch,
            iteration=self.iteration,
            pbar=None,
        )

    def _evaluate(self, dl: Iterable, dtype: torch.dtype) -> tuple[torch.Tensor | None, int]:
        """Sample-weighted sums of [loss, *metrics] over `dl`, and the sample count."""
        handler = self._eval_handler()
        totals, count = None, 0
        for i, (x, y) in enumerate(dl):
            x, y = to_device((x, y), self.data.device)
            x, y = handler(
                "on_batch_begin", last_input=cast_floats(x, dtype), last_target=y, num_batch=i
            )
            output = handler("on_loss_begin", last_output=call_model(self.model, x))
            output = cast_floats(output, torch.float32)
            if i == 0:
                check_class_dim(self.loss_func, output, y)
            n = batch_size(y)
            values = [self.loss_func(output, y), *(m(output, y) for m in self.metrics)]
            batch = torch.stack([torch.as_tensor(v).float().reshape(()) for v in values]) * n
            totals = batch if totals is None else totals + batch
            count += n
        return totals, count

    @torch.no_grad()
    def predict(self, x: Any) -> Any:
        """The model's output (fp32) for a batch `x`, in eval mode, through the callbacks'
        `on_batch_begin` (target None) and `on_loss_begin`, as in validate(); `x` is moved to
        the data's device and cast to the model's dtype (a dict is passed as keywords)."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = cast_floats(to_device(x, self.data.device), input_dtype(self.model))
            handler = self._eval_handler()
            x, _ = handler("on_batch_begin", last_input=x, last_target=None, num_batch=0)
            with self.forward_context():
                output = handler("on_loss_begin", last_output=call_model(self.model, x))
                return cast_floats(output, torch.float32)
        finally:
            self.model.train(was_training)

    # -- freezing ------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Freeze the layer groups before index `n` (their norm layers stay trainable) and
        unfreeze the others."""
        freeze_to(self.layer_groups, n)

    def freeze(self) -> None:
        """Freeze every layer group but the last, keeping norm layers trainable. Refused with
        one layer group (the default, the whole model), which would freeze nothing."""
        if len(self.layer_groups) < 2:
            raise ValueError(
                "freeze() freezes every layer group but the last, and this learner has one "
                "layer group (the whole model), so it would freeze nothing. Pass the groups "
                "when building it: Learner(data, model, layer_groups=[model.body, model.head]) "
                "(an nn.Module each), or freeze parameters yourself with requires_grad_(False)."
            )
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Make every layer group trainable."""
        self.freeze_to(0)

    # -- precision -----------------------------------------------------------------------
    @property
    def mixed_precision(self) -> MixedPrecision | None:
        """The `MixedPrecision` callback, if this learner trains in mixed precision."""
        return next((cb for cb in self.callbacks if isinstance(cb, MixedPrecision)), None)

    def forward_context(self) -> AbstractContextManager:
        """The region the forward pass and the loss run in: `torch.autocast` when training
        with `to_fp16(mode="autocast")`, else nothing."""
        mp = self.mixed_precision
        return nullcontext() if mp is None else mp.forward_context()

    def to_fp16(
        self, loss_scale: LossScale = 512.0, flat_master: bool = False, **options: Any
    ) -> Learner:
        """Convert the model to half now and train it with a `MixedPrecision` callback built
        with these options (`dtype`, `clip`, `fused`, `mode`, `telemetry`, the `LossScaler`
        keywords); returns self. `mode="autocast"` keeps the model fp32 under torch.autocast."""
        if self.mixed_precision is not None:
            raise ValueError(
                "this learner is already in mixed precision; call learn.to_fp32() first to "
                "change the options."
            )
        cb = MixedPrecision(self, loss_scale, flat_master, **options)
        undo = self._drop_replaced_params()  # the wrapper takes only the model's parameters
        try:
            cb.prepare()
        except BaseException:
            undo()
            raise
        self.callbacks.append(cb)
        return self

    def to_fp32(self) -> Learner:
        """Back to fp32: the model takes the fp32 master weights and the optimizer, with
        its state, steps the model again; returns self."""
        for cb in [cb for cb in self.callbacks if isinstance(cb, MixedPrecision)]:
            cb.release()
            self.callbacks.remove(cb)
        if input_dtype(self.model) in HALF_DTYPES:  # converted by hand
            model_to_float(self.model)
        return self

    def add_cb(self, cb: Callback) -> None:
        """Add a callback for the next `fit()` calls."""
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be Callback instances; got {type(cb).__name__}. "
                "Subclass mixprec.Callback and pass an instance."
            )
        self.callbacks.append(cb)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, name: str) -> Path:
        """Write the model (under mixed precision: its fp32 master weights, under the
        parameters' names), the optimizer (state, loss scaler), the epoch and step counts,
        the history and the random state to `path/model_dir/{name}.pth`, atomically; return
        that path. Under torchrun every rank calls it and rank 0 writes."""
        return save_learner(self, self._checkpoint_path(name))

    def load(self, name: str) -> Learner:
        """Restore what `save(name)` wrote, random state included, so training resumes as if
        it had never stopped (on every rank, under torchrun); returns self. Everything is
        checked first: a checkpoint that does not fit is refused, naming what differs, and
        changes nothing."""
        load_learner_(self, self._checkpoint_path(name))
        return self

    def _checkpoint_path(self, name: str) -> Path:
        return self.path / self.model_dir / checkpoint_file_name(name)

    def __repr__(self) -> str:
        return (
            f"Learner(model={type(self.model).__name__}, opt={type(self.opt).__name__}, "
            f"epoch={self.epoch}, callbacks={self.callbacks})"
        )
