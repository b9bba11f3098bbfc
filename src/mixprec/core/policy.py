"""PrecisionPolicy: which modules, parameters and buffers of a model stay fp32 when the rest
is converted to fp16 or bf16.

The default rules, and why each module is kept (`fp32_roots` says which rule did it):

- `NORM_TYPES`: torch's norm layers, by `isinstance`.
- `NORM_CLASS_NAMES`: a module with no child modules whose class name ends in "Norm",
  optionally followed by "1d", "2d" or "3d" (LlamaRMSNorm, T5LayerNorm, MistralRMSNorm,
  timm's LayerNorm2d, FrozenBatchNorm2d). Modules with children (a `PreNorm(fn)` wrapper)
  are not kept whole; their norm child is.
- `HF_FP32_MODULES`: what a Hugging Face model declares in `_keep_in_fp32_modules_strict`
  (always) and `_keep_in_fp32_modules` (under fp16, as transformers applies it): the
  modules, under the declaring model, with an entry as a dot-separated part of their name.
- Shared parameters: a parameter is fp32 if any module owning it is kept, and every module
  owning a kept parameter is kept too ("tied to ..."), so plan and conversion agree and a
  tied embedding computes in fp32 and hands half on (GPT-2's `wte` and `lm_head`).
- Buffers: a float buffer of a kept module stays fp32; elsewhere it is cast, unless its
  qualified name matches one of `fp32_buffers` (default `FP32_BUFFERS`: rotary `inv_freq`,
  whose users compute positions in fp32 and cast the result to the input's dtype).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

__all__ = [
    "DEFAULT_FP32",
    "FP32_BUFFERS",
    "HF_FP32_MODULES",
    "NORM_CLASS_NAMES",
    "NORM_TYPES",
    "ClassNameRule",
    "Declared",
    "HFKeepInFP32",
    "PrecisionPolicy",
    "Rule",
    "TiedTo",
    "as_policy",
    "is_norm",
    "rule_text",
]

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
        nn.modules.instancenorm._InstanceNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
"""torch's norm layers: kept in fp32 by default, since their statistics lose too much in half."""


class ClassNameRule:
    """Keeps the leaf modules (no child modules) whose class name matches `regex`."""

    def __init__(self, regex: str) -> None:
        self.regex = regex
        self._compiled = re.compile(regex)

    def matches(self, module: nn.Module) -> bool:
        return (
            self._compiled.search(type(module).__name__) is not None
            and next(module.children(), None) is None
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassNameRule) and other.regex == self.regex

    def __hash__(self) -> int:
        return hash(("ClassNameRule", self.regex))

    def __repr__(self) -> str:
        return f"ClassNameRule({self.regex!r})"


class HFKeepInFP32:
    """Keeps what a Hugging Face model declares in `_keep_in_fp32_modules(_strict)`."""

    def kept(self, model: nn.Module, dtype: torch.dtype | None) -> dict[int, str]:
        """Module id -> why, for every module a declaring (sub)model of `model` lists."""
        found: dict[int, str] = {}
        for _, owner in model.named_modules():
            entries = set(getattr(owner, "_keep_in_fp32_modules_strict", None) or ())
            if dtype in (None, torch.float16):
                entries |= set(getattr(owner, "_keep_in_fp32_modules", None) or ())
            entries = {e for e in entries if isinstance(e, str) and e}
            for name, module in owner.named_modules():
                dotted = f".{name}."
                for entry in sorted(entries):
                    if f".{entry}." in dotted:
                        found.setdefault(
                            id(module), f"{type(owner).__name__}._keep_in_fp32_modules {entry!r}"
                        )
        return found

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFKeepInFP32)

    def __hash__(self) -> int:
        return hash("HFKeepInFP32")

    def __repr__(self) -> str:
        return "HF_FP32_MODULES"


class TiedTo:
    """Why a module is kept: it owns a parameter that a kept module owns too."""

    def __init__(self, param: str, owner: str) -> None:
        self.param, self.owner = param, owner

    def __repr__(self) -> str:
        return f"TiedTo({self.param!r}, {self.owner!r})"


class Declared:
    """Why a module is kept: the model declares it (HF's `_keep_in_fp32_modules`)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Declared({self.text!r})"


NORM_CLASS_NAMES = ClassNameRule(r"Norm(?:[123]d)?$")
"""Leaf modules whose class name says they are a norm layer (LlamaRMSNorm, LayerNorm2d)."""

HF_FP32_MODULES = HFKeepInFP32()
"""The modules a Hugging Face model declares fp32 (`_keep_in_fp32_modules`)."""

DEFAULT_FP32: tuple = (*NORM_TYPES, NORM_CLASS_NAMES, HF_FP32_MODULES)
"""The default rules: norm layers by type and by class name, and HF's declared modules."""

FP32_BUFFERS: tuple[str, ...] = ("*inv_freq",)
"""Float buffers kept fp32 in half modules, by fnmatch over qualified buffer names: rotary
inverse frequencies (HF's `inv_freq`, `original_inv_freq`), which their modules cast to fp32
to compute positions and whose results they cast to the input's dtype."""

Rule = type[nn.Module] | str | ClassNameRule | HFKeepInFP32
"""A module type (kept with its subclasses), an fnmatch pattern over qualified module names
(or parameter names: see `PrecisionPolicy`), or one of the rule objects above."""

Reason = Rule | TiedTo | Declared

# Never in a glob over qualified module names: whitespace, an empty part (leading, trailing or
# doubled dots).
_BAD_PATTERN = re.compile(r"\s|^\.|\.$|\.\.")


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm layer by the default rules (type or class name)."""
    return isinstance(module, NORM_TYPES) or NORM_CLASS_NAMES.matches(module)


def rule_text(reason: Reason) -> str:
    """How `plan()` names the rule that keeps a module fp32."""
    if isinstance(reason, str):
        return f"name {reason!r}"
    if isinstance(reason, type):
        return f"type {reason.__name__}"
    if reason == NORM_CLASS_NAMES:
        return "norm class name"
    if isinstance(reason, ClassNameRule):
        return f"class name /{reason.regex}/"
    if isinstance(reason, Declared):
        return reason.text
    if isinstance(reason, TiedTo):
        return f"tied to {reason.owner or '(model)'} ({reason.param})"
    return repr(reason)


def _owned(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """(module name, module, qualified parameter name, parameter) for every owner of every
    parameter, shared ones once per owner."""
    return [
        (name, module, f"{name}.{pname}" if name else pname, p)
        for name, module in model.named_modules(remove_duplicate=False)
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False)
    ]


class PrecisionPolicy:
    """Which modules, parameters and buffers of a model stay in fp32 when the rest is
    converted to fp16 or bf16.

    Each rule is a module type (matched with `isinstance`), an fnmatch-style pattern over
    the qualified names of `model.named_modules()` ("head", "head.*", "*.attn.softmax") or
    of its parameters ("cls_token", "*.gamma"), or a rule object (`NORM_CLASS_NAMES`,
    `HF_FP32_MODULES`)::

        policy = PrecisionPolicy().keep("head", "*.attn.softmax")   # defaults + these
        print(mixprec.plan(model, policy))                          # check before training
        model_to_half(model, keep_fp32=policy)

    A matched module stays fp32 with everything inside it; it takes its floating inputs cast
    to fp32 and returns its outputs cast back to the half dtype. A parameter matched by name
    (and no module) stays fp32 inside its half module, which computes with it by type
    promotion (elementwise ops and `cat` promote to fp32; a matmul or convolution refuses
    mixed dtypes, so keep such a module instead) and returns its outputs cast to the half
    dtype. The default rules are `DEFAULT_FP32` (see the module docstring); `without(...)`
    drops some. `fp32_buffers` are fnmatch patterns over qualified buffer names kept fp32
    in half modules (default `FP32_BUFFERS`; `()` casts them all). With `strict` (the
    default) a name pattern that matches nothing in the model is an error, so a typo
    cannot silently leave a layer in half.
    """

    def __init__(
        self,
        keep_fp32: Iterable[Rule] = DEFAULT_FP32,
        *,
        strict: bool = True,
        fp32_buffers: Iterable[str] = FP32_BUFFERS,
    ) -> None:
        if isinstance(keep_fp32, (str, type)):
            raise TypeError(
                f"keep_fp32 must be an iterable of rules; got the single rule {keep_fp32!r}. "
                f"Wrap it in a tuple: keep_fp32=({keep_fp32!r},)."
            )
        rules = tuple(keep_fp32)
        for rule in rules:
            _check_rule(rule)
        if isinstance(fp32_buffers, str):
            raise TypeError(
                f"fp32_buffers must be an iterable of patterns; got {fp32_buffers!r}. Wrap it "
                f"in a tuple: fp32_buffers=({fp32_buffers!r},)."
            )
        buffers = tuple(fp32_buffers)
        for pattern in buffers:
            if not isinstance(pattern, str):
                raise TypeError(f"fp32_buffers holds {pattern!r}; expected name patterns.")
            _check_rule(pattern)
        self.rules: tuple[Rule, ...] = tuple(dict.fromkeys(rules))  # drop repeats, keep order
        self.strict = bool(strict)
        self.fp32_buffers: tuple[str, ...] = tuple(dict.fromkeys(buffers))

    @property
    def types(self) -> tuple[type[nn.Module], ...]:
        """The type rules."""
        return tuple(r for r in self.rules if isinstance(r, type))

    @property
    def patterns(self) -> tuple[str, ...]:
        """The name-pattern rules."""
        return tuple(r for r in self.rules if isinstance(r, str))

    def _with(self, rules: Iterable[Rule], buffers: Iterable[str]) -> PrecisionPolicy:
        return PrecisionPolicy(tuple(rules), strict=self.strict, fp32_buffers=tuple(buffers))

    def keep(self, *rules: Rule) -> PrecisionPolicy:
        """A new policy with these rules added."""
        return self._with((*self.rules, *rules), self.fp32_buffers)

    def without(self, *rules: Rule) -> PrecisionPolicy:
        """A new policy without these rules (e.g. `without(HF_FP32_MODULES)`)."""
        missing = [r for r in rules if r not in self.rules]
        if missing:
            raise ValueError(f"the policy has no rule {missing[0]!r}; its rules: {self!r}.")
        return self._with((r for r in self.rules if r not in rules), self.fp32_buffers)

    def keep_buffers(self, *patterns: str) -> PrecisionPolicy:
        """A new policy that also keeps the float buffers matching these patterns fp32."""
        return self._with(self.rules, (*self.fp32_buffers, *patterns))

    def match(self, name: str, module: nn.Module) -> Rule | None:
        """The first type, module-name or class-name rule that keeps the module named `name`
        in fp32, or None (`HF_FP32_MODULES` needs the model: see `fp32_roots`)."""
        for rule in self.rules:
            if isinstance(rule, str):
                if fnmatchcase(name, rule):
                    return rule
            elif isinstance(rule, ClassNameRule):
                if rule.matches(module):
                    return rule
            elif isinstance(rule, type) and isinstance(module, rule):
                return rule
        return None

    def fp32_roots(
        self, model: nn.Module, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[nn.Module, Reason]]:
        """The outermost modules kept in fp32, by qualified name, with the rule that keeps each
        (a `TiedTo` for a module kept because it shares a parameter with a kept one).

        `dtype` is the half dtype converted to (HF's `_keep_in_fp32_modules` applies under
        fp16 only); None counts every rule. Raises ValueError if `strict` and a name
        pattern matches no module or parameter of `model`.
        """
        if self.strict:
            unmatched = self.unmatched_patterns(model)
            if unmatched:
                raise ValueError(
                    self.unmatched_message(model, unmatched)
                    + " Fix the pattern, or build the policy with strict=False to allow it."
                )
        hf = {}
        for rule in self.rules:
            if isinstance(rule, HFKeepInFP32):
                hf = rule.kept(model, dtype)
        roots: dict[str, tuple[nn.Module, Reason]] = {}
        inside: set[int] = set()  # ids of the modules within the roots found so far
        # Pre-order, every path of a shared module: a pattern may name it by either path.
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) in inside:
                continue
            rule = self.match(name, module)
            if rule is None and id(module) in hf:
                rule = Declared(hf[id(module)])
            if rule is not None:
                roots[name] = (module, rule)
                inside.update(id(m) for m in module.modules())
        self._add_tied(model, roots, inside)
        return roots

    @staticmethod
    def _add_tied(
        model: nn.Module, roots: dict[str, tuple[nn.Module, Reason]], inside: set[int]
    ) -> None:
        """Keep every module owning a parameter that a kept module owns (until none is left)."""
        owned = _owned(model)
        while True:
            kept = {}
            for name, module, pname, p in owned:
                if id(module) in inside:
                    kept.setdefault(id(p), (pname, name))
            tied = [
                (name, module, kept[id(p)])
                for name, module, _, p in owned
                if id(module) not in inside and id(p) in kept
            ]
            if not tied:
                return
            for name, module, (pname, owner) in tied:
                if id(module) not in inside:
                    roots[name] = (module, TiedTo(pname, owner))
                    inside.update(id(m) for m in module.modules())

    def fp32_params(
        self, model: nn.Module, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[nn.Parameter, str]]:
        """Parameters kept fp32 by a name pattern though their module is converted: qualified
        name -> (parameter, pattern); shared ones under their first name."""
        roots = self.fp32_roots(model, dtype)
        inside = {id(m) for root, _ in roots.values() for m in root.modules()}
        kept_ids = {id(p) for _, module, _, p in _owned(model) if id(module) in inside}
        found: dict[str, tuple[nn.Parameter, str]] = {}
        seen: set[int] = set()
        for _, _, pname, p in _owned(model):
            if id(p) in kept_ids or id(p) in seen:
                continue
            rule = next((r for r in self.patterns if fnmatchcase(pname, r)), None)
            if rule is not None:
                found[pname] = (p, rule)
                seen.add(id(p))
        return found

    def keeps_buffer(self, name: str) -> str | None:
        """The `fp32_buffers` pattern that keeps the buffer qualified `name` fp32, or None."""
        return next((b for b in self.fp32_buffers if fnmatchcase(name, b)), None)

    def unmatched_patterns(self, model: nn.Module) -> list[str]:
        """The name patterns that match no module and no parameter of `model`."""
        names = [n for n, _ in model.named_modules(remove_duplicate=False)]
        names += [n for n, _ in model.named_parameters(remove_duplicate=False)]
        return [p for p in self.patterns if not any(fnmatchcase(n, p) for n in names)]

    def unmatched_message(self, model: nn.Module, unmatched: list[str]) -> str:
        """Which patterns of `unmatched` match nothing in `model`, its module names and the
        closest names to each (the fix is the caller's to say)."""
        names = [n for n, _ in model.named_modules() if n]
        params = [n for n, _ in model.named_parameters()]
        hints = []
        for pattern in unmatched:
            close = difflib.get_close_matches(pattern, names + params, n=3)
            if close:
                hints.append(f"{pattern!r}: did you mean {', '.join(map(repr, close))}?")
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return (
            f"fp32 name pattern(s) {', '.join(map(repr, unmatched))} match no module or "
            f"parameter of {type(model).__name__} (module names: {shown}). " + " ".join(hints)
        ).rstrip()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrecisionPolicy):
            return NotImplemented
        return (self.rules, self.strict, self.fp32_buffers) == (
            other.rules,
            other.strict,
            other.fp32_buffers,
        )

    def __hash__(self) -> int:
        return hash((self.rules, self.strict, self.fp32_buffers))

    def __repr__(self) -> str:
        shown = ", ".join(
            r if isinstance(r, str) else r.__name__ if isinstance(r, type) else repr(r)
            for r in self.rules
        )
        return (
            f"PrecisionPolicy(keep_fp32=[{shown}], strict={self.strict}, "
            f"fp32_buffers={list(self.fp32_buffers)})"
        )


def as_policy(keep_fp32: Iterable[Rule] | PrecisionPolicy | None) -> PrecisionPolicy:
    """`keep_fp32` as a policy: None is the default one, an iterable of rules becomes one."""
    if keep_fp32 is None:
        return PrecisionPolicy()
    if isinstance(keep_fp32, PrecisionPolicy):
        return keep_fp32
    return PrecisionPolicy(keep_fp32)


def _check_rule(rule: object) -> None:
    if isinstance(rule, str):
        if not rule or _BAD_PATTERN.search(rule) or rule.count("[") != rule.count("]"):
            raise ValueError(
                f"bad module name pattern {rule!r}: expected an fnmatch pattern over qualified "
                "module names, without spaces or empty parts, e.g. 'head', 'head.*' or "
                "'*.attn.softmax'."
            )
        return
    if isinstance(rule, type) and issubclass(rule, nn.Module):
        return
    if isinstance(rule, (ClassNameRule, HFKeepInFP32)):
        return
    hint = (
        f" Pass the class {type(rule).__name__}, not an instance."
        if isinstance(rule, nn.Module)
        else ""
    )
    raise TypeError(
        "an fp32 rule must be an nn.Module subclass (e.g. nn.LayerNorm) or a module name "
        f"pattern (e.g. 'head.*'); got {rule!r} ({type(rule).__name__}).{hint}"
    )
