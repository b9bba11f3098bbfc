"""Converting models and batches between fp32 and half precision (fp16 or bf16)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.core.checks import check_module
from mixprec.core.dtypes import HALF_DTYPES, check_half_dtype
from mixprec.core.policy import DEFAULT_FP32, PrecisionPolicy, Rule, as_policy
from mixprec.core.ranges import warn_out_of_range

__all__ = ["cast_floats", "input_dtype", "model_to_float", "model_to_half", "restore_fp32_"]

_HOOKS_ATTR = "_mixprec_fp32_hooks"


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor in a (nested) tuple/list/dict to `dtype`; leave the rest."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, Mapping):
        return type(obj)({k: cast_floats(v, dtype) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def _cast_tensor_(t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.is_floating_point() and t.dtype != dtype:
        t.data = t.data.to(dtype)
        if t.grad is not None:
            t.grad = t.grad.to(dtype)


def _convert_own_tensors_(module: nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters(recurse=False):
        _cast_tensor_(p, dtype)
    for name, b in module.named_buffers(recurse=False):
        if b is not None and b.is_floating_point() and b.dtype != dtype:
            setattr(module, name, b.to(dtype))


# BatchNorm kernels on these devices take a half input with fp32 weights and statistics and
# compute in fp32: the input stays half, so backward saves it in 2 bytes an element, not 4.
_MIXED_INPUT_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MIXED_INPUT_DEVICES = ("cpu", "cuda")


def _to_fp32_inputs(module: nn.Module, args: tuple) -> tuple:
    if (
        type(module) in _MIXED_INPUT_NORMS
        and len(args) == 1
        and isinstance(args[0], torch.Tensor)
        and args[0].dtype in HALF_DTYPES
        and args[0].device.type in _MIXED_INPUT_DEVICES
        and all(p.dtype == torch.float32 for p in module.parameters(recurse=False))
    ):
        return args
    return cast_floats(args, torch.float32)


def _output_caster(dtype: torch.dtype):
    def cast_output(module: nn.Module, args: tuple, output: Any) -> Any:
        return cast_floats(output, dtype)

    return cast_output


def _remove_fp32_hooks(module: nn.Module) -> None:
    handles: list[RemovableHandle] = module.__dict__.pop(_HOOKS_ATTR, [])
    for h in handles:
        h.remove()


def model_to_half(
    model: nn.Module,
    dtype: torch.dtype = torch.float16,
    keep_fp32: tuple[Rule, ...] | PrecisionPolicy = DEFAULT_FP32,
) -> nn.Module:
    """Convert `model` in place to `dtype`, keeping what `keep_fp32` says in fp32.

    `keep_fp32` is a tuple of rules (module types, name patterns, rule objects) or a
    `PrecisionPolicy`; the default keeps the norm layers (by type and by class name) and
    what a Hugging Face model declares in `_keep_in_fp32_modules`. A kept module stays fp32
    with everything inside it, receives its floating inputs cast to fp32 and returns its
    floating outputs cast back to `dtype`, so the half model takes and returns `dtype`. A
    parameter owned by several modules is fp32 if any of them is kept (and then they all
    are). A parameter kept by name stays fp32 in its half module, whose outputs are cast to
    `dtype`. Float buffers of half modules are cast, except those the policy's
    `fp32_buffers` name (rotary `inv_freq` by default). Returns the same module.
    Weights that `dtype` cannot hold (beyond fp16's range, or already inf/nan) are warned
    about (RuntimeWarning) before anything is converted.
    """
    check_module(model)
    check_half_dtype(dtype)
    policy = as_policy(keep_fp32)
    roots = [m for m, _ in policy.fp32_roots(model, dtype).values()]
    root_ids = {id(m) for m in roots}
    kept = {id(m) for r in roots for m in r.modules()}
    kept_params = {id(p) for p, _ in policy.fp32_params(model, dtype).values()}
    warn_out_of_range(((n, m) for n, m in model.named_modules() if id(m) not in kept), dtype)
    cast_out = _output_caster(dtype)
    for name, module in model.named_modules():
        _remove_fp32_hooks(module)
        if id(module) in kept:
            _convert_own_tensors_(module, torch.float32)
            if id(module) in root_ids:  # casts at the boundary only: fp32 all the way inside
                module.__dict__[_HOOKS_ATTR] = [
                    module.register_forward_pre_hook(_to_fp32_inputs),
                    module.register_forward_hook(cast_out),
                ]
            continue
        own = list(module.parameters(recurse=False))
        for p in own:
            _cast_tensor_(p, torch.float32 if id(p) in kept_params else dtype)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                keep = policy.keeps_buffer(f"{name}.{bname}" if name else bname)
                target = torch.float32 if keep else dtype
                if b.dtype != target:
                    setattr(module, bname, b.to(target))
        if any(id(p) in kept_params for p in own):  # computes by promotion: hand half on
            module.__dict__[_HOOKS_ATTR] = [module.register_forward_hook(cast_out)]
    return model


def model_to_float(model: nn.Module) -> nn.Module:
    """Convert `model` in place back to fp32 and remove the hooks `model_to_half` added."""
    check_module(model)
    for module in model.modules():
        _remove_fp32_hooks(module)
        _convert_own_tensors_(module, torch.float32)
    return model


@torch.no_grad()
def restore_fp32_(model: nn.Module, exact: Mapping[int, torch.Tensor]) -> nn.Module:
    """Undo `model_to_half`: `model` back to fp32, each parameter whose id is in `exact`
    holding that exact value (not the fp32 of its rounded half copy)."""
    model_to_float(model)
    for p in model.parameters():
        if id(p) in exact:
            p.copy_(exact[id(p)])
    return model


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs should have: the model's half dtype if it has one, else its float one."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype in HALF_DTYPES:
        if dtype in dtypes:
            return dtype
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
