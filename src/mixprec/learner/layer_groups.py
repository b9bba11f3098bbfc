"""Layer groups: the parts of a model that are frozen, unfrozen and given param groups together."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mixprec.core.policy import is_norm

__all__ = ["freeze_to", "split_params"]

ParamSplit = tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]


def split_params(layer_groups: Sequence[nn.Module]) -> list[ParamSplit]:
    """Per layer group, its (weights, biases, norm-layer params), in `.parameters()` order; a
    parameter shared between groups belongs to the first."""
    seen: set[int] = set()
    split = []
    for group in layer_groups:
        weights, biases, norms = [], [], []
        for module in group.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if is_norm(module):
                    norms.append(p)
                elif name == "bias":
                    biases.append(p)
                else:
                    weights.append(p)
        split.append((weights, biases, norms))
    return split


def freeze_to(layer_groups: Sequence[nn.Module], n: int) -> None:
    """Freeze the layer groups before index `n` (negative: from the end), keeping their norm
    layers trainable, and make the others trainable."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int (a layer-group index); got {n!r}.")
    groups = split_params(layer_groups)
    start = n if n >= 0 else max(len(groups) + n, 0)
    for i, (weights, biases, norms) in enumerate(groups):
        for p in (*weights, *biases):
            p.requires_grad_(i >= start)
        for p in norms:
            p.requires_grad_(True)
