"""Adam(W) from half gradients in one pass on CPU, bit for bit torch's fused kernel.

torch's fused Adam(W) takes gradients of the parameter's dtype only, so the fused step
otherwise casts each chunk of half gradients to fp32, runs torch's kernel and rounds the new
masters back into the half weights: three passes. mixprec's C kernel
(`mixprec.core.native`) reads the half gradient, updates the master and the moments and
writes the half weight (or, for split masters, the weight and its low bits) in one.

Whether a product-plus-sum of torch's kernel is one FMA or two roundings is decided by the
compiler that built torch (probed in benchmarks/RESULTS.md), so before a configuration
(Adam or AdamW, weight decay, amsgrad, maximize, a loss scale, the half dtype, split
masters) first runs natively, `agrees()` runs both kernels on the same random probe and
compares every bit; a configuration where they differ stays on torch's kernel. The elements
past the last multiple of 64 of each tensor (torch's kernel computes a tensor's last few
elements in its scalar loop) stay on torch's kernel too.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mixprec.core import native
from mixprec.core.split import split_all_

__all__ = [
    "ALIGN", "GroupFlags", "NativePiece", "NativeSet", "agrees", "first_elements", "group_flags",
    "kind_of",
]  # fmt: skip

ALIGN = 64
"""Native pieces end at a multiple of this many elements (a multiple of any SIMD width)."""

_HALF = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "split": torch.bfloat16,
    "f32": torch.float32,
}


@dataclass(frozen=True)
class GroupFlags:
    """What decides the shape of one param group's arithmetic (not its values)."""

    decoupled: bool  # AdamW's decay of the parameter (else Adam's L2 term on the gradient)
    weight_decay: bool
    amsgrad: bool
    maximize: bool


def group_flags(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> GroupFlags:
    """The flags of `group` of the Adam/AdamW `optimizer`."""
    return GroupFlags(
        decoupled=isinstance(optimizer, torch.optim.AdamW)
        or bool(group.get("decoupled_weight_decay", False)),
        weight_decay=float(group["weight_decay"]) != 0.0,
        amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
    )


@dataclass
class NativePiece:
    """Elements `[0, n)` of one item, updated natively: `master` is the fp32 master (or for
    split masters the bf16 weight, with its int16 `low` bits), `half` the half weight the
    master is rounded into (None for split masters, and for an fp32 parameter that is its
    own master)."""

    group: int
    kind: str  # "bf16", "f16", "split" or "f32"
    item: int  # which of the step's gradients feeds it
    n: int
    master: torch.Tensor
    low: torch.Tensor | None
    half: torch.Tensor | None
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    step: torch.Tensor
    grad: torch.Tensor | None = None  # this step's gradient (a view), None between steps


def kind_of(
    view: torch.Tensor, grad: torch.Tensor, half: torch.Tensor, low: torch.Tensor | None
) -> str | None:
    """The native kernel for an item (its master `view`, gradient `grad` and weight `half`),
    or None if it has none: CPU, contiguous, gradients of the weight's dtype, and a bf16,
    fp16 or fp32 weight of an fp32 master (an fp32 weight may be the master itself)."""
    parts = (view, grad, half) if low is None else (view, grad, half, low)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in parts):
        return None
    if low is not None:
        return "split" if grad.dtype == half.dtype == torch.bfloat16 else None
    if view.dtype != torch.float32 or grad.dtype != half.dtype:
        return None
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(half.dtype)


def adam_args(
    group: dict[str, Any], flags: GroupFlags, step: float, scale: float | None, zero: bool
) -> native.AdamArgs:
    """The constants of one param group's step, computed as torch's kernel computes them: in
    double, then rounded to fp32 (by ctypes, as C rounds a double to a float)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    lib = native.library()
    assert lib is not None
    return native.AdamArgs(
        c1=1 - beta1,
        b2=beta2,
        c2=1 - beta2,
        bc2s=math.sqrt(1 - beta2**step),
        eps=float(group["eps"]),
        neg_step=-(lr / (1 - beta1**step)),
        c7=1 - lr * wd if flags.decoupled and flags.weight_decay else 1.0,
        wd=wd,
        scale=scale if scale is not None else 1.0,
        sign=-1.0 if flags.maximize else 1.0,
        l2=int(flags.weight_decay and not flags.decoupled),
        amsgrad=int(flags.amsgrad),
        has_scale=int(scale is not None),
        zero_grad=int(zero),
        mxcsr=lib.mixprec_mxcsr(),
    )


def _table(pieces: Sequence[NativePiece]) -> ctypes.Array[native.AdamPiece]:
    table = (native.AdamPiece * len(pieces))()
    for row, piece in zip(table, pieces):
        sq = piece.exp_avg_sq
        out = piece.low if piece.kind == "split" else piece.half
        assert out is not None or piece.kind == "f32"
        row.master, row.half = piece.master.data_ptr(), 0 if out is None else out.data_ptr()
        row.m, row.v = piece.exp_avg.data_ptr(), sq.data_ptr()
        row.mx = (piece.max_exp_avg_sq if piece.max_exp_avg_sq is not None else sq).data_ptr()
        row.n, row.kind = piece.n, native.KINDS[piece.kind]
    return table


def first_elements(grad: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` elements of the contiguous `grad` (itself when it has n: no view made)."""
    return grad if grad.numel() == n else grad.view(-1)[:n]


class NativeSet:
    """A step's native pieces and the table the kernels read them from: built once per plan,
    a step points it at the step's gradients, checks them and steps every piece, one call
    each."""

    def __init__(self) -> None:
        self.pieces: list[NativePiece] = []
        self.numel = 0
        self._table: ctypes.Array[native.AdamPiece] | None = None
        self._steps: list[ctypes.c_float] = []  # each piece's step counter, in place

    def add(self, piece: NativePiece) -> None:
        """Step `piece` too."""
        self.pieces.append(piece)
        self.numel += piece.n
        self._table = None

    def __iter__(self) -> Iterator[NativePiece]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def _ready(self) -> ctypes.Array[native.AdamPiece]:
        if self._table is None:
            self._table = _table(self.pieces)
            self._steps = [native.cpu_scalar_view(piece.step) for piece in self.pieces]
            for row, piece in zip(self._table, self.pieces):
                if piece.grad is not None:
                    row.grad = piece.grad.data_ptr()
        return self._table

    def set_grads(self, grads: Sequence[torch.Tensor]) -> bool:
        """Point every piece at its item's gradient among `grads` (one per item); False,
        changing nothing, if one is not contiguous or too short."""
        for piece in self.pieces:
            g = grads[piece.item]
            if not g.is_contiguous() or g.numel() < piece.n:  # the kernel reads n elements
                return False
        for row, piece in zip(self._ready(), self.pieces):
            piece.grad = first_elements(grads[piece.item], piece.n)
            row.grad = piece.grad.data_ptr()
        return True

    def release_grads(self) -> None:
        """Drop the views of this step's gradients (so that zero_grad() frees them)."""
        for piece in self.pieces:
            piece.grad = None

    def any_nonfinite(self) -> bool:
        """Whether a piece's gradient holds an inf or nan: one read of each, one call."""
        lib = native.library()
        assert lib is not None and all(piece.grad is not None for piece in self.pieces)
        return bool(lib.mixprec_nonfinite_pieces(self._ready(), len(self.pieces)))

    def step(
        self,
        groups: Sequence[dict[str, Any]],
        flags: Sequence[GroupFlags],
        scale: float | None,
        zero: bool,
    ) -> None:
        """One Adam(W) step of every piece from its half gradient divided by `scale` (None:
        as it is), with its param group's hyper-parameters; the step counters are already
        advanced. Gradients zeroed as read if `zero`."""
        table = self._ready()
        index: dict[tuple[int, float], int] = {}
        args: list[native.AdamArgs] = []
        for row, piece, step in zip(table, self.pieces, self._steps):
            assert piece.grad is not None
            key = (piece.group, step.value)
            if key not in index:
                index[key] = len(args)
                g = piece.group
                args.append(adam_args(groups[g], flags[g], key[1], scale, zero))
            row.args = index[key]
        lib = native.library()
        assert lib is not None
        arrays = (native.AdamArgs * len(args))(*args)
        native.run_split(functools.partial(lib.mixprec_adam, table, len(table), arrays), self.numel)


# -- the check against torch's kernel ---------------------------------------------------------
_PROBE = 4 * ALIGN * 33  # 8448 elements, two steps


def _split_eagerly(master: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> None:
    split_all_([master], [high], [low], [torch.empty_like(master, dtype=torch.int32)])


def agrees(kind: str, flags: GroupFlags, scale: bool, zero: bool) -> bool:
    """Whether the native kernel computes torch's fused kernel's numbers, bit for bit, for
    this configuration (two steps on a random probe; the answer is kept for the process)."""
    return native.library() is not None and _agrees(kind, flags, scale, zero)


@functools.cache
def _agrees(kind: str, flags: GroupFlags, scale: bool, zero: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    n, half_dtype = _PROBE, _HALF[kind]
    master = torch.randn(n, generator=gen)
    group = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.01 if flags.weight_decay else 0.0,
        "amsgrad": flags.amsgrad,
        "maximize": flags.maximize,
    }
    ref = [master.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n)]
    ours_m, ours_v, ours_mx = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    if kind == "split":
        high, low = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.int16)
        _split_eagerly(master, high, low)
        ref[0] = high.float().view(torch.int32).add_(low.to(torch.int32)).view(torch.float32)
        ours_master, ours_half = high, None
    elif kind == "f32":  # into a copy: the weight a half model keeps in fp32
        ours_master, low, ours_half = master.clone(), None, master.clone()
    else:
        ours_master, low, ours_half = master.clone(), None, master.to(half_dtype)
    kernel = torch._fused_adamw_ if flags.decoupled else torch._fused_adam_
    step_ref = torch.zeros(())
    for step in (1, 2):
        grad = (torch.randn(n, generator=gen) * (3.0 if scale else 1.0)).to(half_dtype)
        step_ref += 1
        kernel(
            [ref[0]],
            [grad.to(torch.float32, copy=True)],  # torch unscales fp32 gradients in place
            [ref[1]],
            [ref[2]],
            [ref[3]] if flags.amsgrad else [],
            [step_ref],
            lr=group["lr"],
            beta1=0.9,
            beta2=0.999,
            weight_decay=group["weight_decay"],
            eps=1e-8,
            amsgrad=flags.amsgrad,
            maximize=flags.maximize,
            grad_scale=torch.full((1,), 3.0) if scale else None,
            found_inf=None,
        )
        piece = NativePiece(
            0, kind, 0, n, ours_master, low, ours_half, ours_m, ours_v,
            ours_mx if flags.amsgrad else None, torch.tensor(float(step)), grad,
        )  # fmt: skip
        pieces = NativeSet()
        pieces.add(piece)
        pieces.step([group], [flags], 3.0 if scale else None, zero)
        if zero and grad.view(torch.uint8).any():  # zeroed: every bit
            return False
    if kind == "split":
        want_high, want_low = torch.empty_like(high), torch.empty_like(low)
        _split_eagerly(ref[0], want_high, want_low)
        same = torch.equal(high.view(torch.int16), want_high.view(torch.int16))
        same = same and torch.equal(low, want_low)
    else:
        assert ours_half is not None
        same = torch.equal(ours_master.view(torch.int32), ref[0].view(torch.int32))
        same = same and torch.equal(
            ours_half.view(torch.uint8), ref[0].to(half_dtype).view(torch.uint8)
        )
    moments = [(ours_m, ref[1]), (ours_v, ref[2])] + ([(ours_mx, ref[3])] * flags.amsgrad)
    return same and all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in moments)
