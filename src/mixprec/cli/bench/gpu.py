"""`mixprec bench gpu`: training throughput and peak memory, six precision setups side by side.

A GPT-2-small-like transformer (tokens/s) and a ResNet-50-like CNN (images/s) train on
synthetic data with AdamW in each setup: fp32 with TF32 off, TF32, torch.amp fp16 +
GradScaler, torch.amp bf16, and mixprec fp16 (dynamic scale) and bf16, both with
`flat_master=True, fused=True`. Peak memory is `torch.cuda.max_memory_allocated`. The
default sizes take a few minutes on one GPU; `--device cpu --tiny` is a seconds-long smoke
run of the same code.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.cli.bench.common import (
    add_common_arguments,
    apply_threads,
    cuda_missing,
    format_table,
    print_result,
)
from mixprec.cli.bench.models import gpt2_small, resnet50_like, tiny_gpt, tiny_resnet
from mixprec.cli.options import non_negative_int, positive_int
from mixprec.core.convert import model_to_half
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["CONFIGS", "MODELS", "Workload", "add_arguments", "measure", "run", "workload"]

CONFIGS: tuple[str, ...] = ("fp32", "tf32", "amp_fp16", "amp_bf16", "mixprec_fp16", "mixprec_bf16")
MODELS: tuple[str, ...] = ("gpt", "resnet")
BASELINE = "amp_fp16"


@dataclass
class Workload:
    """A model factory, one synthetic batch, its loss and how many units (tokens, images)."""

    make: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    units: int
    unit: str


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def workload(name: str, device: torch.device, tiny: bool, batch: int | None) -> Workload:
    """The `name` workload ("gpt" or "resnet") at full or `tiny` size on `device`."""
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        seq, vocab, make = (64, 256, tiny_gpt) if tiny else (1024, 50257, gpt2_small)
        b = batch or (2 if tiny else 16)
        tokens = torch.randint(0, vocab, (b, seq + 1), generator=g).to(device)
        return Workload(make, tokens[:, :-1], tokens[:, 1:], _lm_loss, b * seq, "tokens/s")
    if name == "resnet":
        size, classes, make = (32, 10, tiny_resnet) if tiny else (224, 1000, resnet50_like)
        b = batch or (4 if tiny else 128)
        images = torch.randn(b, 3, size, size, generator=g).to(device)
        labels = torch.randint(0, classes, (b,), generator=g).to(device)
        loss = lambda out, y: F.cross_entropy(out.float(), y)  # noqa: E731
        return Workload(make, images, labels, loss, b, "images/s")
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}.")


def _train_step(config: str, w: Workload, device: torch.device) -> Callable[[], None]:
    """Build the model and optimizer for `config`; return one training step."""
    torch.manual_seed(0)
    tf32 = config != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = w.make().to(device)
    x, y = w.inputs, w.targets
    if config.startswith("mixprec"):
        dtype = torch.float16 if config.endswith("fp16") else torch.bfloat16
        model_to_half(model, dtype)
        x = x.to(dtype) if x.is_floating_point() else x
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-4),
            "dynamic" if dtype == torch.float16 else 1.0,
            flat_master=True,
            fused=True,
        )

        def mixprec_step() -> None:
            opt.backward(w.loss(model(x), y))
            opt.step()
            opt.zero_grad()

        return mixprec_step
    opt_fp32 = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp_dtype = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}.get(config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def torch_step() -> None:
        ctx = torch.autocast(device.type, amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            out = model(x)
        scaler.scale(w.loss(out, y)).backward()
        scaler.step(opt_fp32)
        scaler.update()
        opt_fp32.zero_grad(set_to_none=True)

    return torch_step


def _measure_one(config: str, w: Workload, device: torch.device, warmup: int, steps: int):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = _train_step(config, w, device)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return seconds, peak


def measure(
    device: str | torch.device = "cuda", *, tiny: bool = False, models=MODELS, configs=CONFIGS,
    warmup: int = 3, steps: int = 10, batch: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`{"device": ..., "rows": [...]}`: per model and config, step time, throughput, peak GiB."""
    device = torch.device(device)
    rows = []
    tf32_flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for name in models:
            w = workload(name, device, tiny, batch)
            for config in configs:
                seconds, peak = _measure_one(config, w, device, warmup, steps)
                rows.append({
                    "model": name, "config": config, "step_ms": round(seconds * 1e3, 3),
                    "throughput": float(f"{w.units / seconds:.4g}"), "unit": w.unit,
                    "peak_mem_gib": None if peak is None else round(peak, 3),
                })  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_flags
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"device": name, "tiny": tiny, "rows": rows}


def format_report(result: dict[str, Any]) -> str:
    """One table: throughput and peak memory, each also relative to torch.amp fp16."""
    base = {(r["model"]): r for r in result["rows"] if r["config"] == BASELINE}
    rows = []
    for r in result["rows"]:
        b = base.get(r["model"])
        mem = r["peak_mem_gib"]
        rows.append([
            r["model"], r["config"], r["step_ms"], r["throughput"], r["unit"],
            r["throughput"] / b["throughput"] if b else None, mem,
            mem / b["peak_mem_gib"] if b and mem is not None and b["peak_mem_gib"] else None,
        ])  # fmt: skip
    headers = ["model", "config", "step ms", "throughput", "unit", "x amp fp16", "peak GiB",
               "mem x amp"]  # fmt: skip
    size = "tiny models" if result["tiny"] else "full size"
    return (
        f"training throughput on {result['device']} ({size})\n"
        + format_table(headers, rows)
        + "\ntarget: mixprec_fp16 >= 1.1x amp_fp16 throughput"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench gpu`."""
    parser.add_argument("--device", default="cuda", help="torch device")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a quick smoke run")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run"
    )
    parser.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="precisions to run"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps")
    parser.add_argument(
        "--batch", type=positive_int, default=None, help="batch size (default: per model)"
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success, 2 if the device is missing."""
    apply_threads(args.threads)
    if cuda_missing(args.device, "try `--device cpu --tiny`"):
        return 2
    result = measure(
        args.device, tiny=args.tiny, models=args.models, configs=args.configs,
        warmup=args.warmup, steps=args.steps, batch=args.batch,
    )  # fmt: skip
    print_result(format_report(result), result, args.json)
    return 0
