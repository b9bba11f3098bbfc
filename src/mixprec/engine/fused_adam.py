"""Adam(W) on fp32 masters straight from half gradients, with no fp32 gradient kept.

On CPU, most elements take one pass of mixprec's native kernel
(`mixprec.engine.native_adam`): half gradient in, master and moments updated, half weight
out, bit for bit the path below. The rest (other devices, odd layouts, clipped steps, fp32
gradients, each tensor's last elements past a multiple of 64, a machine without a C
compiler) takes torch's kernel: a step streams over the parameters in chunks
(`mixprec.core.chunked.chunk_numel`: cache-sized on a CPU; on a GPU large enough that the
kernels outlast their launches). Each chunk's half gradients are cast into an fp32 scratch
buffer, torch's fused Adam(W) kernel unscales (and clips) them through its `grad_scale`
argument and updates the masters and moments, and the new masters are rounded straight
back into the half model (on a CPU while still in cache). The only fp32 gradient memory is
the scratch (one chunk per device), so Adam's training state is 16 bytes per parameter:
half params and grads, fp32 masters and two moments.

The numbers are those of the wrapped `torch.optim.Adam`/`AdamW` stepping unscaled fp32
gradients, within fp32 rounding; its `state` and `param_groups` are used as they are, so
schedulers, `state_dict()` and the unfused path all see one optimizer.

This module (and native_adam's probe of them) is the only one that calls torch's private
fused kernels (`torch._fused_adam_`, `torch._fused_adamw_`). The public path, `torch.optim.AdamW(fused=True).step()` with its
`grad_scale` and `found_inf` attributes set, needs whole fp32 gradients on the masters: 4
bytes more per parameter held, and a step 15 to 21 % slower than this one on 8.4M
parameters (the half gradients checked, cast into the fp32 gradients, stepped, the masters
cast back: 13.79 and 13.17 ms against 11.97 and 10.86 ms in two runs; the command and the
machine are in benchmarks/RESULTS.md, "The public fused AdamW path").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mixprec.core import native
from mixprec.core.chunked import chunk_numel
from mixprec.core.scaler import check_finite_
from mixprec.core.split import Span, join_all_, split_all_
from mixprec.engine.fused_items import FusedItem
from mixprec.engine.native_adam import (
    ALIGN,
    GroupFlags,
    NativePiece,
    NativeSet,
    agrees,
    first_elements,
    group_flags,
    kind_of,
)

__all__ = [
    "FUSED_TYPES",
    "FusedAdamStep",
    "fused_device_supported",
    "fused_unsupported_reason",
    "step_from_master_grads_",
]

FUSED_TYPES: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
"""The optimizers the fused step implements (exact types: a subclass may change `step`)."""


@dataclass
class _Chunk:
    group: int
    params: list[torch.Tensor] = field(default_factory=list)
    scratch: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    halves: list[torch.Tensor] = field(default_factory=list)  # to round the new masters into
    masters: list[torch.Tensor] = field(default_factory=list)  # the params those come from
    # split masters: the rebuilt fp32 views, their bf16 and int16 halves, an int32 work view
    split_masters: list[torch.Tensor] = field(default_factory=list)
    split_highs: list[torch.Tensor] = field(default_factory=list)
    split_lows: list[torch.Tensor] = field(default_factory=list)
    split_work: list[torch.Tensor] = field(default_factory=list)
    split_span: bool = True  # every split master of the chunk lies in its scratch stretch
    # where each of `grads` comes from: (item index, start of the 1-D piece or None: whole)
    grad_src: list[tuple[int, int | None]] = field(default_factory=list)
    numel: int = 0


class _Plan(NamedTuple):
    """A step's work: torch's kernel over `chunks`, the native kernel over `natives` (each
    item's elements up to its last multiple of `ALIGN`, on CPU), the distinct step counters,
    and each param group's flags."""

    chunks: list[_Chunk]
    steps: list[torch.Tensor]
    natives: NativeSet
    flags: list[GroupFlags]
    counters: native.StepCounters | None = None  # `steps`, advanced in one native call


def fused_unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the fused step cannot stand in for `optimizer.step()`; None if it can."""
    if type(optimizer) not in FUSED_TYPES:
        return (
            f"the fused step implements torch.optim.Adam and AdamW; got {type(optimizer).__name__}"
        )
    if not hasattr(torch, "_fused_adamw_"):
        return f"this torch ({torch.__version__}) has no fused Adam kernels"
    for group in optimizer.param_groups:
        if group.get("differentiable", False):
            return "differentiable=True is not supported by the fused kernels"
    return None


@functools.cache
def _fused_device_types() -> frozenset[str]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: the two it always had
        return frozenset(("cpu", "cuda"))
    return frozenset(_get_fused_kernels_supported_devices())


def fused_device_supported(device: torch.device) -> bool:
    """Whether torch has fused Adam kernels for `device` (looked up once per process)."""
    return device.type in _fused_device_types()


def _scalar(x: Any) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


class FusedAdamStep:
    """Runs the wrapped Adam/AdamW's update from half gradients, chunk by chunk."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunk: int | None = None) -> None:
        reason = fused_unsupported_reason(optimizer)
        if reason is not None:
            raise ValueError(f"fused=True cannot be used: {reason}. Pass fused=False.")
        self.optimizer = optimizer
        self.chunk = None if chunk is None else int(chunk)  # None: chunk_numel(device)
        self._scratch: dict[tuple[torch.device, int], torch.Tensor] = {}
        # split masters stored one ulp off (mixprec.core.split), counted if asked: the count
        # is a reduction per chunk, as slow as the rest of the split bookkeeping together
        self.count_ties = False
        self.ties: dict[torch.device, torch.Tensor] = {}
        # the one-pass CPU kernel (mixprec.engine.native_adam) where it agrees with torch's
        self.use_native = True
        # (key, plan, the objects the key names by id, kept alive so no id is reused)
        self._cache: tuple[tuple[Any, ...], _Plan, list[Any]] | None = None

    # -- state ------------------------------------------------------------------------------
    def _state(self, master: torch.Tensor, amsgrad: bool) -> dict[str, Any]:
        """The optimizer's state for `master`, created as torch's Adam would if empty."""
        state = self.optimizer.state[master]
        fp32 = {"dtype": torch.float32, "memory_format": torch.preserve_format}
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, **fp32)
            state["exp_avg_sq"] = torch.zeros_like(master, **fp32)
        elif state["step"].device != master.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(master.device, torch.float32)  # kernels need both
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(master, **fp32)
        return state

    def _chunk_for(self, device: torch.device) -> int:
        return chunk_numel(device) if self.chunk is None else self.chunk

    def _scratch_for(self, device: torch.device, which: int = 0) -> torch.Tensor:
        """fp32 scratch `which` of `chunk` elements on `device`: 0 for gradients, 1 for
        rebuilt split masters."""
        key = (device, which)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(
                self._chunk_for(device), dtype=torch.float32, device=device
            )
        return self._scratch[key]

    # -- the plan: chunks of views, rebuilt only when a tensor behind them changes ---------
    def plan(self, groups: Sequence[Sequence[FusedItem]], cache: bool, clip: bool = False) -> _Plan:
        """The work of a step over items per param group; `clip`: the step takes the global
        norm, over the same chunk pieces whether or not the native kernel could run."""
        flags = [group_flags(self.optimizer, pg) for pg in self.optimizer.param_groups]
        use_native = self.use_native and not clip and native.library() is not None
        grads = [it.grad for items in groups for it in items]
        head = (use_native, self.count_ties, *flags, *map(len, groups))
        if cache and self._cache is not None and self._cache[0][0] == head:
            # The steady state: the states as they are. A cached plan was made over states
            # _state() had readied, and the key names each of their tensors.
            opt_state = self.optimizer.state
            sts = [opt_state.get(it.master) for items in groups for it in items]
            if all(sts) and self._cache[0][1] == _item_key(groups, sts):
                plan = self._cache[1]
                if _repoint_grads(plan, grads):
                    return plan
        states = [
            [self._state(it.master, bool(pg["amsgrad"])) for it in items]
            for items, pg in zip(groups, self.optimizer.param_groups)
        ]
        plan = _Plan([], [], NativeSet(), flags)
        steps: dict[int, torch.Tensor] = {}
        k = 0
        for g, (items, sts) in enumerate(zip(groups, states)):
            for it, st in zip(items, sts):
                steps[id(st["step"])] = st["step"]
                self._add_item(plan, g, it, st, k, use_native)
                k += 1
        plan.steps.extend(steps.values())
        if native.StepCounters.possible(plan.steps):
            plan = plan._replace(counters=native.StepCounters(plan.steps))
        # a piece with its own scratch (odd layout) is not kept: it would hold fp32 memory
        whole = any(src[1] is None for c in plan.chunks for src in c.grad_src)
        if cache and not whole:
            flat_states = [st for sts in states for st in sts]
            named = [
                (it.master, it.half, it.low, *st.values())
                for it, st in zip((it for its in groups for it in its), flat_states)
            ]
            self._cache = ((head, _item_key(groups, flat_states)), plan, named)
        else:
            self._cache = None
        return plan

    def _native_kind(self, it: FusedItem, flags: GroupFlags) -> str | None:
        """The native kernel for item `it`, if it has one agreeing with torch's kernel."""
        kind = kind_of(it.view, it.grad, it.half, it.low)
        if kind is None or (kind == "split" and self.count_ties):
            return None
        every = (agrees(kind, flags, scale, zero) for scale in (False, True) for zero in (0, 1))
        return kind if all(every) else None

    def _add_item(
        self, plan: _Plan, g: int, it: FusedItem, st: dict[str, Any], k: int, use_native: bool
    ) -> None:
        chunks = plan.chunks
        chunk = self._chunk_for(it.view.device)
        moments = [st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq")]
        if it.offset is not None:  # a slice of a flat master: slice its state the same way
            n = it.view.numel()
            moments = [
                None if m is None else m.view(-1)[it.offset : it.offset + n] for m in moments
            ]
        parts = [it.view, it.grad, it.half, *(m for m in (*moments, it.low) if m is not None)]
        contiguous = all(t.is_contiguous() for t in parts)
        every = (it.view, it.grad, it.half, it.low, *moments)
        # an fp32 parameter that is its own master: nothing to round the new values into
        in_place = it.half.dtype == it.view.dtype and it.half.data_ptr() == it.view.data_ptr()
        if contiguous:
            flat = [None if t is None else t.view(-1) for t in every]
            kind = self._native_kind(it, plan.flags[g]) if use_native else None
            n = it.view.numel()
            native_n = n - n % ALIGN if kind is not None else 0
            if native_n:
                view, _, half, low, exp_avg, exp_avg_sq, max_sq = (
                    None if t is None else t[:native_n] for t in flat
                )
                assert view is not None and half is not None and exp_avg is not None
                assert exp_avg_sq is not None and kind is not None
                plan.natives.add(
                    NativePiece(
                        g, kind, k, native_n, half if low is not None else view, low,
                        None if low is not None or in_place else half,
                        exp_avg, exp_avg_sq, max_sq,
                        st["step"], first_elements(it.grad, native_n),
                    )
                )  # fmt: skip
            bounds = range(native_n, n, chunk)
            pieces = [[None if t is None else t[a : a + chunk] for t in flat] for a in bounds]
            starts: list[int | None] = list(bounds)
        else:  # an odd layout: one piece with its own scratch (allocated per step)
            pieces = [list(every)]
            starts = [None]
        for (view, grad, half, low, exp_avg, exp_avg_sq, max_sq), start in zip(pieces, starts):
            n = view.numel()
            if not chunks or chunks[-1].group != g or chunks[-1].numel + n > chunk:
                chunks.append(_Chunk(group=g))
            c = chunks[-1]
            if contiguous:
                scratch = self._scratch_for(view.device)[c.numel : c.numel + n]
            else:  # same layout as the master, as the kernel expects
                scratch = torch.empty_like(
                    view, dtype=torch.float32, memory_format=torch.preserve_format
                )
            if low is not None:  # the kernel steps the master rebuilt in scratch
                rebuilt = (
                    self._scratch_for(view.device, 1)[c.numel : c.numel + n]
                    if contiguous
                    else torch.empty_like(scratch, memory_format=torch.preserve_format)
                )
                view = rebuilt
                c.split_span = c.split_span and contiguous
                c.split_masters.append(rebuilt)
                c.split_highs.append(half)
                c.split_lows.append(low)
                c.split_work.append(scratch.view(torch.int32))  # free once the kernel ran
            elif not in_place:
                c.halves.append(half)
                c.masters.append(view)
            if contiguous:
                c.numel += n
            c.params.append(view)
            c.scratch.append(scratch)
            c.exp_avgs.append(exp_avg)
            c.exp_avg_sqs.append(exp_avg_sq)
            if max_sq is not None:
                c.max_exp_avg_sqs.append(max_sq)
            c.steps.append(st["step"])
            c.grads.append(grad)
            c.grad_src.append((k, start))

    # -- the two passes ----------------------------------------------------------------------
    def check_(self, plan: _Plan, found_inf: torch.Tensor, want_norm: bool) -> torch.Tensor | None:
        """Set `found_inf` if any half gradient is inf/nan; with `want_norm` return the global
        2-norm of the (still scaled) gradients instead, non-finite on overflow. No host sync
        on a GPU (on CPU, `check_finite_` reads a sum on the host)."""
        if not want_norm:
            if plan.natives and plan.natives.any_nonfinite():  # one call over its table
                found_inf.fill_(1.0)
            elif plan.chunks:
                check_finite_([g for c in plan.chunks for g in c.grads], found_inf)
            return None
        assert not plan.natives  # a clipping step is planned without them
        norms: list[torch.Tensor] = []
        for c in plan.chunks:  # norms of half tensors are slow: take them in fp32, in cache
            if all(g.dtype == torch.float32 for g in c.grads):
                norms.extend(torch._foreach_norm(c.grads))
                continue
            torch._foreach_copy_(c.scratch, c.grads)
            norms.extend(torch._foreach_norm(c.scratch))
        if not norms:
            return torch.zeros((), device=found_inf.device)
        return torch.linalg.vector_norm(torch.stack(norms))

    def _kernel_args(self, group: int, device: torch.device) -> tuple[Any, dict[str, Any]]:
        """The fused kernel and its hyper-parameters for param group `group` (an lr tensor on
        another device read once: a host sync per group and step, not per chunk)."""
        pg = self.optimizer.param_groups[group]
        beta1, beta2 = pg["betas"]
        decoupled = isinstance(self.optimizer, torch.optim.AdamW) or pg.get(
            "decoupled_weight_decay", False
        )
        lr = pg["lr"]
        if torch.is_tensor(lr) and lr.device != device:
            lr = lr.item()
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        return kernel, {
            "amsgrad": bool(pg["amsgrad"]),
            "lr": lr,
            "beta1": _scalar(beta1),
            "beta2": _scalar(beta2),
            "weight_decay": float(pg["weight_decay"]),
            "eps": float(pg["eps"]),
            "maximize": bool(pg["maximize"]),
        }

    def _span(self, c: _Chunk) -> Span | None:
        """(rebuilt masters' bits, an int32 work span): the chunk's whole stretch of the two
        scratches, for bit passes over all its split masters at once; None if it has none or
        one is laid out oddly. Stretches of the chunk's fp32 parameters ride along unused."""
        if not c.split_masters or not c.split_span:
            return None
        device = c.split_masters[0].device
        return (
            self._scratch_for(device, 1)[: c.numel].view(torch.int32),
            self._scratch_for(device, 0)[: c.numel].view(torch.int32),
        )

    def invalidate(self) -> None:
        """Forget the cached chunk plan (after a load or a failed step)."""
        self._cache = None

    def update_(self, plan: _Plan, grad_scale: torch.Tensor | None, zero_grads: bool) -> None:
        """One Adam(W) step of the plan from its gradients (half, or fp32 master ones)
        divided by `grad_scale` (None: as they are); the new masters are rounded into the half
        model, and the gradients zeroed if asked."""
        if plan.counters is not None:
            plan.counters.advance()
        elif plan.steps:
            torch._foreach_add_(plan.steps, 1)
        if plan.natives:  # on CPU: reading the scale is no device sync
            scale = None if grad_scale is None else native.cpu_scalar(grad_scale)
            plan.natives.step(self.optimizer.param_groups, plan.flags, scale, zero_grads)
        per_group: dict[int, tuple[Any, dict[str, Any]]] = {}  # read once per step, not chunk
        for c in plan.chunks:
            span = self._span(c)
            if c.split_masters:  # rebuild the fp32 masters from the bf16 weights and low bits
                join_all_(c.split_masters, c.split_highs, c.split_lows, c.split_work, span)
            if c.group not in per_group:
                per_group[c.group] = self._kernel_args(c.group, c.params[0].device)
            kernel, args = per_group[c.group]
            # fp32 gradients kept as they are (master grads) need no cast into the scratch
            fp32 = not zero_grads and all(g.dtype == torch.float32 for g in c.grads)
            grads = c.grads if fp32 else c.scratch
            if not fp32:
                torch._foreach_copy_(c.scratch, c.grads)
            if zero_grads:
                torch._foreach_zero_(c.grads)
            kernel(
                c.params,
                grads,
                c.exp_avgs,
                c.exp_avg_sqs,
                c.max_exp_avg_sqs,
                c.steps,
                **args,
                grad_scale=grad_scale,
                found_inf=None,
            )
            if c.halves:
                torch._foreach_copy_(c.halves, c.masters)  # fp32 -> half while in cache
            if c.split_masters:
                ties = None
                if self.count_ties:
                    device = c.split_masters[0].device
                    if device not in self.ties:
                        self.ties[device] = torch.zeros((), dtype=torch.int64, device=device)
                    ties = self.ties[device]
                split_all_(c.split_masters, c.split_highs, c.split_lows, c.split_work, ties, span)

    def step(
        self,
        items: Sequence[Sequence[FusedItem]],
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scale: float,
        clip: float | None,
        flat: bool,
        sync: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[bool, torch.Tensor | None]:
        """A whole step at loss scale `scale`: check (and with `clip`, the global norm of the
        unscaled gradients, clipped as `clip_grad_norm_` does), one host sync, then the update
        unless a gradient overflowed; `flat` items' gradients are zeroed as they are read.

        `buffers` are 1-element fp32 tensors (found_inf, unused, scale) reused across steps;
        `sync` may all-reduce found_inf across ranks. Returns (overflowed, unscaled gradient
        norm or None). Call under `torch.no_grad()`.
        """
        found_inf, _, scale_buf = buffers
        found_inf.zero_()
        state = self.optimizer.state
        fresh = [it.master for group in items for it in group if not state.get(it.master)]
        plan = self.plan(items, cache=True, clip=clip is not None)
        norm = self.check_(plan, found_inf, want_norm=clip is not None)
        if norm is not None:
            norm = norm / scale
            found_inf.copy_((~torch.isfinite(norm)).reshape(1))
        if sync is not None:
            sync(found_inf)
        overflow = bool(found_inf.item())  # the one host sync of the step
        if not overflow:
            scale_buf.fill_(scale)
            grad_scale: torch.Tensor | None = scale_buf  # the kernel divides the gradients by it
            if norm is not None:
                grad_scale = scale_buf / torch.clamp(clip / (norm + 1e-6), max=1.0)
            elif scale == 1.0:
                grad_scale = None  # x / 1 == x: the kernel skips the division and its store
            self.update_(plan, grad_scale, zero_grads=flat)
        elif fresh:  # a skipped step leaves no trace: drop the state plan() just created
            for master in fresh:
                state.pop(master, None)
            self._cache = None
        _release_grads(plan)
        return overflow, norm


def _item_key(
    groups: Sequence[Sequence[FusedItem]], states: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """What a cached plan depends on, per item (`states`: each item's optimizer state).

    The cache keeps every object named here by id alive, so no id can be reused; a
    parameter given new memory (`p.data = ...`) keeps its id, not its data_ptr. Gradients
    are left out: a backward after zero_grad(set_to_none=True) makes new ones, and the plan
    only re-points its views of them."""
    items = (it for its in groups for it in its)
    return [
        (id(it.master), it.master.data_ptr(), it.offset, id(it.half), it.half.data_ptr(),
         id(it.low), it.grad.dtype, *map(id, st.values()))
        for it, st in zip(items, states)
    ]  # fmt: skip


def _release_grads(plan: _Plan) -> None:
    """Drop a plan's views of this step's gradients, so that zero_grad() frees them."""
    for c in plan.chunks:
        c.grads = []
    plan.natives.release_grads()


def _repoint_grads(plan: _Plan, grads: Sequence[torch.Tensor]) -> bool:
    """Point a cached plan's gradient views at this step's `grads` (same shapes and dtypes,
    one per item); False if one cannot be viewed as the plan needs (plan again)."""
    if not plan.natives.set_grads(grads):
        return False
    for c in plan.chunks:
        new = []
        for k, start in c.grad_src:
            g = grads[k]
            if start is None or not g.is_contiguous():
                return False
            new.append(g.view(-1)[start : start + c.params[len(new)].numel()])
        c.grads = new
    return True


def step_from_master_grads_(step: FusedAdamStep, items: Sequence[Sequence[FusedItem]]) -> None:
    """Adam(W)-step masters whose fp32 gradients are unscaled (and clipped) already, chunk by
    chunk, rounding the new masters into the half model while still in cache: the wrapped
    optimizer's `step()` and the master-to-model copy in one pass. Call under no_grad()."""
    plan = step.plan(items, cache=True)
    step.update_(plan, None, zero_grads=False)
    _release_grads(plan)
