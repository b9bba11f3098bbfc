"""`plan(model, policy, dtype)`: what converting a model to half would do, before doing it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixprec.core.dtypes import check_half_dtype
from mixprec.core.policy import (
    HF_FP32_MODULES,
    NORM_CLASS_NAMES,
    NORM_TYPES,
    ClassNameRule,
    PrecisionPolicy,
    rule_text,
)
from mixprec.core.ranges import advice_rule, range_warnings

__all__ = ["BufferPlan", "ModulePlan", "Plan", "plan"]

_BF16_EVIDENCE = 256  # nonzero fp32 values, all exact in bf16, that make "loaded from bf16" likely


@dataclass(frozen=True)
class ModulePlan:
    """One module under the plan: its own parameters' dtype and bytes, and why it is fp32."""

    name: str  # qualified name; "" for the model itself
    type: str
    dtype: torch.dtype  # the dtype it computes in after conversion
    rule: str  # why it stays fp32 ("type LayerNorm", "name 'head.*'", "in head"); "" if half
    params: int  # elements of its own parameters (shared ones counted at their first owner)
    bytes_before: int
    bytes_after: int
    fp32_params: str = ""  # own parameters kept fp32 by name in a half module, and the rule


@dataclass(frozen=True)
class BufferPlan:
    """One float buffer under the plan: its dtype now and after, and why it stays fp32."""

    name: str  # qualified name
    dtype_before: torch.dtype
    dtype: torch.dtype  # after conversion
    rule: str  # why it stays fp32 ("in rotary_emb", "buffer '*inv_freq'"); "" if cast


@dataclass(frozen=True)
class Plan:
    """What `model_to_half(model, dtype, policy)` would do; printing it gives a table."""

    model: str
    dtype: torch.dtype
    policy: PrecisionPolicy
    modules: tuple[ModulePlan, ...]
    master_bytes: int  # fp32 masters that MixedPrecisionOptimizer adds for trainable params
    warnings: tuple[str, ...] = field(default=())
    buffers: tuple[BufferPlan, ...] = field(default=())  # every float buffer

    @property
    def bytes_before(self) -> int:
        """Parameter bytes now."""
        return sum(m.bytes_before for m in self.modules)

    @property
    def bytes_after(self) -> int:
        """Parameter bytes of the converted model (without the fp32 masters)."""
        return sum(m.bytes_after for m in self.modules)

    @property
    def fp32_modules(self) -> list[str]:
        """Names of the modules that stay fp32."""
        return [m.name for m in self.modules if m.rule]

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-ready values (dtypes as names like "float16")."""
        return {
            "model": self.model,
            "dtype": _short(self.dtype),
            "policy": repr(self.policy),
            "modules": [{**vars(m), "dtype": _short(m.dtype)} for m in self.modules],
            "buffers": [
                {**vars(b), "dtype_before": _short(b.dtype_before), "dtype": _short(b.dtype)}
                for b in self.buffers
            ],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "master_bytes": self.master_bytes,
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        header = ("module", "type", "dtype", "params", "bytes before", "bytes after", "fp32 by")
        rows = [
            (
                m.name or "(model)",
                m.type,
                _short(m.dtype),
                f"{m.params:,}",
                f"{m.bytes_before:,}",
                f"{m.bytes_after:,}",
                m.rule or m.fp32_params or "-",
            )
            for m in self.modules
        ]
        params = sum(m.params for m in self.modules)
        total = ("total", "", "", f"{params:,}", f"{self.bytes_before:,}", f"{self.bytes_after:,}")
        widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(6)]
        right = {3, 4, 5}

        def line(cells: tuple[str, ...]) -> str:
            out = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ]
            return "  ".join([*out, *cells[6:]]).rstrip()

        rule = "-" * len(line(header))
        lines = [
            f"plan: {self.model} to {_short(self.dtype)}; fp32 kept for {_describe(self.policy)}",
            line(header),
            rule,
            *map(line, rows),
            rule,
            line(total),
            f"parameter bytes {_human(self.bytes_before)} -> {_human(self.bytes_after)}; "
            f"+ {_human(self.master_bytes)} of fp32 masters under MixedPrecisionOptimizer "
            f"= {_human(self.bytes_after + self.master_bytes)}",
        ]
        if self.buffers:
            width = max(len(b.name) for b in self.buffers)
            lines.append("float buffers:")
            lines += [
                f"  {b.name.ljust(width)}  {_short(b.dtype_before)} -> {_short(b.dtype)}"
                f"  {b.rule or 'cast'}"
                for b in self.buffers
            ]
        lines += [f"warning: {w}" for w in self.warnings] or ["warnings: none"]
        return "\n".join(lines)


def plan(
    model: nn.Module, policy: PrecisionPolicy | None = None, dtype: torch.dtype = torch.float16
) -> Plan:
    """The dtype of every module of `model` under `policy` (default: norm layers in fp32),
    parameter bytes before and after, and warnings; `model` is left untouched."""
    check_half_dtype(dtype)
    if policy is None:
        policy = PrecisionPolicy()
    elif not isinstance(policy, PrecisionPolicy):
        raise TypeError(
            f"policy must be a PrecisionPolicy or None; got {type(policy).__name__}. Build one "
            "with PrecisionPolicy(keep_fp32=(...)) or PrecisionPolicy().keep('head')."
        )
    roots = policy.fp32_roots(model, dtype)
    why: dict[int, str] = {}
    for root_name, (root, rule) in roots.items():
        for m in root.modules():
            why.setdefault(id(m), rule_text(rule) if m is root else f"in {root_name or '(model)'}")
    root_ids = {id(root) for root, _ in roots.values()}
    by_name = {id(p): rule for p, rule in policy.fp32_params(model, dtype).values()}
    rows: list[ModulePlan] = []
    buffers: list[BufferPlan] = []
    warnings: list[str] = []
    advised: list[str] = []  # the rules the warnings advise, in order
    seen: set[int] = set()  # a shared parameter is counted at its first owner only
    for name, module in model.named_modules():
        own = [
            (pname, p)
            for pname, p in module.named_parameters(prefix=name, recurse=False)
            if id(p) not in seen
        ]
        seen.update(id(p) for _, p in own)
        rule = why.get(id(module), "")
        target = torch.float32 if rule else dtype
        for bname, b in module.named_buffers(prefix=name, recurse=False):
            if b is not None and b.is_floating_point():
                kept = f"in {name or '(model)'}" if id(module) in root_ids else rule
                pattern = policy.keeps_buffer(bname)
                reason = kept or (f"buffer {pattern!r}" if pattern else "")
                buffers.append(
                    BufferPlan(bname, b.dtype, torch.float32 if reason else dtype, reason)
                )
        is_leaf = next(module.children(), None) is None
        has_buffers = next(module.buffers(recurse=False), None) is not None
        if not (own or has_buffers or is_leaf or id(module) in root_ids):
            continue  # a plain container: its children are listed
        kept_params = [(pname, p) for pname, p in own if id(p) in by_name]
        rows.append(
            ModulePlan(
                name=name,
                type=type(module).__name__,
                dtype=target,
                rule=rule,
                params=sum(p.numel() for _, p in own),
                bytes_before=sum(p.numel() * p.element_size() for _, p in own),
                bytes_after=sum(
                    _bytes_as(p, torch.float32 if id(p) in by_name else target) for _, p in own
                ),
                fp32_params=", ".join(
                    f"param {pname.rpartition('.')[2]}: name {by_name[id(p)]!r}"
                    for pname, p in kept_params
                ),
            )
        )
        if not rule:
            for pname, p in own:
                if id(p) not in by_name:
                    advice = advice_rule(name, module, pname)
                    found = range_warnings(pname, advice, p, dtype)
                    warnings += found
                    advised += [advice] if found and advice not in advised else []
    warnings += _summary(advised)
    warnings += _origin_warnings(model, dtype)
    if not policy.strict:
        warnings += [
            f"fp32 pattern {p!r} matches no module or parameter of {type(model).__name__}."
            for p in policy.unmatched_patterns(model)
        ]
    masters = sum(
        4 * p.numel() for p in model.parameters() if p.requires_grad and p.is_floating_point()
    )
    return Plan(
        type(model).__name__,
        dtype,
        policy,
        tuple(rows),
        masters,
        tuple(warnings),
        tuple(buffers),
    )


def _summary(advised: list[str]) -> list[str]:
    """One rule set that follows every piece of advice at once, by last name part
    ('stages.0.gamma', 'stages.1.gamma' -> '*.gamma'), when that is shorter."""
    patterns = list(dict.fromkeys(f"*.{r.rpartition('.')[2]}" if "." in r else r for r in advised))
    if len(patterns) >= len(advised):
        return []
    shown = ", ".join(map(repr, patterns))
    return [f"to follow all {len(advised)} at once: PrecisionPolicy().keep({shown})."]


def _bytes_as(p: torch.Tensor, dtype: torch.dtype) -> int:
    size = dtype.itemsize if p.is_floating_point() else p.element_size()
    return p.numel() * size


@torch.no_grad()
def _origin_warnings(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """A model stored in bf16, or upcast from bf16 weights, about to be trained in fp16."""
    if dtype != torch.float16:
        return []
    floats = [p for p in model.parameters() if p.is_floating_point()]
    stored = sum(p.numel() for p in floats if p.dtype == torch.bfloat16)
    risk = (
        "bf16 has the range of fp32 but fp16 overflows beyond 65504, and models trained in bf16 "
        "often reach weights, activations or gradients past that (inf/nan, skipped steps); "
        "prefer dtype=torch.bfloat16, or keep the blocks that overflow in fp32."
    )
    if stored:
        return [
            f"{stored:,} parameter values are stored in bfloat16 and would be trained in float16: {risk}"
        ]
    fp32 = [p.detach() for p in floats if p.dtype == torch.float32]
    evidence = sum(int((p != 0).sum()) for p in fp32)
    exact = all(bool((p.to(torch.bfloat16).float() == p).all()) for p in fp32)
    if fp32 and exact and evidence >= _BF16_EVIDENCE:
        return [
            f"every one of the {evidence:,} nonzero fp32 weights is exactly a bfloat16 value: the "
            f"model looks loaded from bf16 weights and would be trained in float16: {risk}"
        ]
    return []


def _describe(policy: PrecisionPolicy) -> str:
    norm_rules = (*NORM_TYPES, NORM_CLASS_NAMES)
    all_norms = set(norm_rules) <= set(policy.rules)
    names = ["norm layers"] if all_norms else []
    for r in policy.rules:
        if all_norms and r in norm_rules:
            continue
        if r == HF_FP32_MODULES:
            names.append("HF _keep_in_fp32_modules")
        elif isinstance(r, ClassNameRule):
            names.append(f"class names /{r.regex}/")
        else:
            names.append(repr(r) if isinstance(r, str) else r.__name__)
    return ", ".join(names) or "nothing"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _human(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
