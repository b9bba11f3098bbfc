"""`mixprec plan MODEL_SPEC`: print what converting a model to half would do, before training."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from mixprec.core.policy import DEFAULT_FP32, PrecisionPolicy
from mixprec.inspect.planning import plan

__all__ = ["DTYPES", "MODEL_SPECS", "add_arguments", "load_model", "parse_dtype", "run"]

MODEL_SPECS: dict[str, str] = {
    "digits-cnn": "mixprec.cli.demo.data:digits_cnn",
    "tiny-transformer": "mixprec.cli.demo.transformer:tiny_transformer",
}
"""Built-in model names -> the `module:function` factory each stands for."""

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(text: str) -> torch.dtype:
    """ "fp16"/"float16" or "bf16"/"bfloat16" -> the torch dtype; ValueError otherwise."""
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {text!r}; choose from {', '.join(DTYPES)}.") from None


def load_model(spec: str) -> nn.Module:
    """A built-in model name (see MODEL_SPECS) or "module:function" -> the model it builds."""
    target = MODEL_SPECS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown model spec {spec!r}: expected one of {', '.join(MODEL_SPECS)}, or "
            "'module:function' naming a factory that returns an nn.Module "
            "(e.g. mypackage.models:make_model)."
        )
    factory = _import(module_name, attr, spec)
    if not callable(factory):
        raise ValueError(f"{spec!r}: {module_name}.{attr} is not callable.")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{spec!r}: {module_name}.{attr}() returned {type(model).__name__}, expected an "
            "nn.Module."
        )
    return model


def _import(module_name: str, attr: str, spec: str) -> Callable[[], object]:
    # Like `python -m`, let a factory in the current directory be found.
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import {module_name!r} ({e}).") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if not hasattr(module, attr):
        raise ValueError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}.")
    return getattr(module, attr)


def _module_type(text: str) -> type[nn.Module]:
    """ "Linear" or "nn.Linear" (torch.nn) or "module:Class" -> the class."""
    module_name, sep, attr = text.rpartition(":")
    if sep:
        found = _import(module_name, attr, text)
    else:
        found = getattr(nn, text.removeprefix("torch.").removeprefix("nn."), None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ValueError(
            f"unknown module type {text!r}: expected a torch.nn class name (e.g. Linear) or "
            "'module:Class' naming an nn.Module subclass."
        )
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_SPEC",
        help=f"{' or '.join(MODEL_SPECS)}, or module:function returning an nn.Module",
    )
    parser.add_argument("--dtype", default="fp16", help="fp16 or bf16")
    parser.add_argument(
        "--keep-fp32",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep modules (or parameters) whose qualified name matches PATTERN in fp32 (repeatable), "
        "e.g. 'head' or '*.attn.softmax'",
    )
    parser.add_argument(
        "--keep-fp32-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="keep modules of TYPE in fp32 (repeatable): a torch.nn class (Linear) or module:Class",
    )
    parser.add_argument(
        "--no-norms", action="store_true", help="do not keep the norm layers in fp32"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        dtype = parse_dtype(args.dtype)
        types = [_module_type(t) for t in args.keep_fp32_type]
        base = () if args.no_norms else DEFAULT_FP32
        policy = PrecisionPolicy((*base, *types, *args.keep_fp32))
        model = load_model(args.model)
        unmatched = policy.unmatched_patterns(model)
        if unmatched:
            raise ValueError(
                policy.unmatched_message(model, unmatched)
                + f" Fix the --keep-fp32 pattern: `mixprec plan {args.model}` without it "
                "lists every module's name."
            )
        result = plan(model, policy, dtype)
    except (ValueError, TypeError) as e:  # a bad MODEL_SPEC or option: one line, status 2
        print(f"mixprec plan: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(json.dumps(result.to_dict()) if args.json else result)
    return 0
