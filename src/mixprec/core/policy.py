"""PrecisionPolicy: rules, by module type or by name pattern, for which modules stay fp32."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["NORM_TYPES", "PrecisionPolicy", "Rule"]

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
"""Norm layers: kept in fp32 by default, since their statistics lose too much in half."""

Rule = type[nn.Module] | str
"""A module type (kept with its subclasses) or an fnmatch pattern over qualified module names."""

# Never in a glob over qualified module names: whitespace, an empty part (leading, trailing or
# doubled dots).
_BAD_PATTERN = re.compile(r"\s|^\.|\.$|\.\.")


class PrecisionPolicy:
    """Which modules of a model stay in fp32 when the rest is converted to fp16 or bf16.

    Each rule is a module type (matched with `isinstance`) or an fnmatch-style pattern over
    the qualified names of `model.named_modules()` ("head", "head.*", "*.attn.softmax")::

        policy = PrecisionPolicy().keep("head", "*.attn.softmax")   # norm layers + these
        print(mixprec.plan(model, policy))                          # check before training
        model_to_half(model, keep_fp32=policy)

    A matched module stays fp32 with everything inside it; it takes its floating inputs cast
    to fp32 and returns its outputs cast back to the half dtype. The default rules are the
    norm layers (`NORM_TYPES`). With `strict` (the default) a name pattern that matches no
    module of the model is an error, so a typo cannot silently leave a layer in half.
    """

    def __init__(self, keep_fp32: Iterable[Rule] = NORM_TYPES, *, strict: bool = True) -> None:
        if isinstance(keep_fp32, (str, type)):
            raise TypeError(
                f"keep_fp32 must be an iterable of rules; got the single rule {keep_fp32!r}. "
                f"Wrap it in a tuple: keep_fp32=({keep_fp32!r},)."
            )
        rules = tuple(keep_fp32)
        for rule in rules:
            _check_rule(rule)
        self.rules: tuple[Rule, ...] = tuple(dict.fromkeys(rules))  # drop repeats, keep order
        self.strict = bool(strict)

    @property
    def types(self) -> tuple[type[nn.Module], ...]:
        """The type rules."""
        return tuple(r for r in self.rules if isinstance(r, type))

    @property
    def patterns(self) -> tuple[str, ...]:
        """The name-pattern rules."""
        return tuple(r for r in self.rules if isinstance(r, str))

    def keep(self, *rules: Rule) -> PrecisionPolicy:
        """A new policy with these rules added."""
        return PrecisionPolicy((*self.rules, *rules), strict=self.strict)

    def match(self, name: str, module: nn.Module) -> Rule | None:
        """The first rule that keeps the module named `name` in fp32, or None."""
        for rule in self.rules:
            if isinstance(rule, str):
                if fnmatchcase(name, rule):
                    return rule
            elif isinstance(module, rule):
                return rule
        return None

    def fp32_roots(self, model: nn.Module) -> dict[str, tuple[nn.Module, Rule]]:
        """The outermost modules kept in fp32, by qualified name, with the rule that keeps each.

        Raises ValueError if `strict` and a name pattern matches no module of `model`.
        """
        if self.strict:
            unmatched = self.unmatched_patterns(model)
            if unmatched:
                raise ValueError(self._unmatched_message(model, unmatched))
        roots: dict[str, tuple[nn.Module, Rule]] = {}
        inside: set[int] = set()  # ids of the modules within the roots found so far
        # Pre-order, every path of a shared module: a pattern may name it by either path.
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) in inside:
                continue
            rule = self.match(name, module)
            if rule is not None:
                roots[name] = (module, rule)
                inside.update(id(m) for m in module.modules())
        return roots

    def unmatched_patterns(self, model: nn.Module) -> list[str]:
        """The name patterns that match no module of `model`."""
        names = [n for n, _ in model.named_modules(remove_duplicate=False)]
        return [p for p in self.patterns if not any(fnmatchcase(n, p) for n in names)]

    def _unmatched_message(self, model: nn.Module, unmatched: list[str]) -> str:
        names = [n for n, _ in model.named_modules() if n]
        hints = []
        for pattern in unmatched:
            close = difflib.get_close_matches(pattern, names, n=3)
            if close:
                hints.append(f"{pattern!r}: did you mean {', '.join(map(repr, close))}?")
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return (
            f"fp32 name pattern(s) {', '.join(map(repr, unmatched))} match no module of "
            f"{type(model).__name__} (module names: {shown}). "
            + (" ".join(hints) + " " if hints else "")
            + "Fix the pattern, or build the policy with strict=False to allow it."
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrecisionPolicy):
            return NotImplemented
        return self.rules == other.rules and self.strict == other.strict

    def __hash__(self) -> int:
        return hash((self.rules, self.strict))

    def __repr__(self) -> str:
        shown = ", ".join(r if isinstance(r, str) else r.__name__ for r in self.rules)
        return f"PrecisionPolicy(keep_fp32=[{shown}], strict={self.strict})"


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
    hint = (
        f" Pass the class {type(rule).__name__}, not an instance."
        if isinstance(rule, nn.Module)
        else ""
    )
    raise TypeError(
        "an fp32 rule must be an nn.Module subclass (e.g. nn.LayerNorm) or a module name "
        f"pattern (e.g. 'head.*'); got {rule!r} ({type(rule).__name__}).{hint}"
    )
