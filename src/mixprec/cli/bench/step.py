"""`mixprec bench step`: whole training steps (forward, backward, optimizer) per mode.

Five model families (`step_models`: ResNet with BatchNorm, ConvNeXt with LayerNorm2d and
layer scale, ViT, GPT with tied embeddings, BERT) train with AdamW on one synthetic batch
in every mode below. The modes of one model are built side by side in one process and run
in turn, one step each per round, so a noisy machine slows them alike; times are medians.
Peak memory is measured in a fresh process per (model, mode), after the imports and the
batch: on a CPU the resident set's high-water mark (reset first, Linux `clear_refs`; else
`ru_maxrss`) minus the resident set before the model is built, on a GPU the rise of
`torch.cuda.max_memory_allocated`.

Modes: `fp32`; `autocast` (torch.autocast with torch's default AdamW, + GradScaler for
fp16) and `autocast+fusedadamw` (the same with `AdamW(fused=True)`); mixprec's
`per-tensor` (`fused=False`), `flat` (`flat_master=True, fused=False`), `fused`,
`flat+fused`, `split` (`master="split"`, bf16 only), `autocast-mode` (`AutocastOptimizer`),
`default` (`MixedPrecisionOptimizer(AdamW(...))`, no options) and `to_fp16` (what
`learn.to_fp16()` runs: static scale 512, the master grads filled by `unscale_()` at
`on_backward_end`, then `step()`).

The headline ratio, `x best`, is against torch's best: `autocast+fusedadamw` of the same
dtype; `x autocast` (torch's default AdamW) is kept beside it. With `compile`, every mode
also runs with its model under `torch.compile` (the optimizers stay eager, on both sides),
and the compiled rows' ratios are to the compiled baselines.

A mixprec step that a non-finite gradient skips (`step()` returns False) is counted: a row
whose steps were skipped timed a check and a skip, not training, and the report says so.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from mixprec.cli.bench.common import (
    add_common_arguments,
    apply_threads,
    cuda_missing,
    describe_machine,
    format_table,
    print_result,
    side_by_side,
)
from mixprec.cli.bench.step_models import FAMILIES, Family, family
from mixprec.cli.options import non_negative_int, positive_int
from mixprec.core.convert import model_to_half
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.optimizer import MixedPrecisionOptimizer

__all__ = ["MODES", "add_arguments", "build_step", "default_mode", "measure", "peak_mib", "run"]

BASELINES: tuple[str, ...] = ("fp32", "autocast", "autocast+fusedadamw")
MIXPREC: dict[str, dict[str, Any]] = {
    "per-tensor": {"fused": False},
    "flat": {"flat_master": True, "fused": False},
    "fused": {"fused": True},
    "flat+fused": {"flat_master": True, "fused": True},
    "split": {"master": "split"},
    "default": {},
}
MODES: tuple[str, ...] = (*BASELINES, *MIXPREC, "autocast-mode", "to_fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LR = 1e-4


def _supported(mode: str, dtype: torch.dtype) -> bool:
    return not (mode == "split" and dtype != torch.bfloat16)


def build_step(
    fam: Family, mode: str, dtype: torch.dtype, device: torch.device, compile: bool = False
) -> tuple[torch.nn.Module, Callable[[], bool | None]]:
    """A fresh model and optimizer for `mode` (in `dtype`), and one training-step callable
    that returns whether the step was applied (None for torch's modes: not told); with
    `compile`, the step runs the model under `torch.compile`."""
    torch.manual_seed(0)
    model = fam.make().to(device)
    x, y = fam.inputs, fam.targets

    def forward(inputs: torch.Tensor) -> torch.Tensor:  # the model as converted by then
        return compiled(inputs)

    compiled: Callable[[torch.Tensor], torch.Tensor] = model
    if mode in BASELINES or mode == "autocast-mode":
        fused_adamw = {"fused": True} if mode == "autocast+fusedadamw" else {}
        inner = torch.optim.AdamW(model.parameters(), lr=LR, **fused_adamw)
        if compile:
            compiled = torch.compile(model)
        if mode == "autocast-mode":
            opt = AutocastOptimizer(inner, dtype=dtype)

            def engine_autocast() -> bool:
                with opt.autocast():
                    loss = fam.loss(forward(x), y)
                opt.backward(loss)
                applied = opt.step()
                opt.zero_grad()
                return applied

            return model, engine_autocast
        amp = None if mode == "fp32" else dtype
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

        def torch_step() -> None:
            with torch.autocast(device.type, amp) if amp is not None else nullcontext():
                out = forward(x)
            scaler.scale(fam.loss(out, y)).backward()
            scaler.step(inner)
            scaler.update()
            inner.zero_grad(set_to_none=True)

        return model, torch_step
    model_to_half(model, dtype)
    if compile:
        compiled = torch.compile(model)
    x = x.to(dtype) if x.is_floating_point() else x
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    if mode == "to_fp16":
        opt = MixedPrecisionOptimizer(inner, 512.0)

        def callback_step() -> bool:  # MixedPrecision's events, in the Learner's order
            opt.backward(fam.loss(forward(x), y))
            opt.unscale_()  # on_backward_end: master grads filled, as documented
            applied = opt.step()
            opt.zero_grad()
            return applied

        return model, callback_step
    opt = MixedPrecisionOptimizer(inner, **MIXPREC[mode])

    def mixprec_step() -> bool:
        opt.backward(fam.loss(forward(x), y))
        applied = opt.step()
        opt.zero_grad()
        return applied

    return model, mixprec_step


def default_mode() -> str:
    """What `MixedPrecisionOptimizer(torch.optim.AdamW(...))` resolves to here, in mode names."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer(torch.optim.AdamW([p]))
    name = ("flat" if opt.flat_master else "per-tensor") + ("+fused" if opt.fused else "")
    return name + ("+split" if getattr(opt, "split", False) else "")


def peak_mib(model: str, mode: str, dtype: str, device: str, tiny: bool, steps: int = 3) -> float:
    """Peak memory of `steps` training steps of `mode` on `model`, in a fresh process (MiB)."""
    code = (
        "import sys; from mixprec.cli.bench.step import _peak_child; "
        f"_peak_child({model!r}, {mode!r}, {dtype!r}, {device!r}, {tiny!r}, {steps!r}, "
        f"{torch.get_num_threads()!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak memory of {model}/{mode} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _peak_child(
    model: str, mode: str, dtype: str, device: str, tiny: bool, steps: int, threads: int
) -> None:
    """In the child process: print the peak memory, MiB, of `steps` steps."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    fam = family(model, tiny, dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.max_memory_allocated(dev)
    else:  # the imports' peak is above what they keep: reset it, start from what is resident
        base = _reset_peak_rss()
    _, step = build_step(fam, mode, DTYPES.get(dtype, torch.float32), dev)
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        print((torch.cuda.max_memory_allocated(dev) - base) / 2**20)
    else:
        print((_peak_rss_kib() - base) / 1024)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the resident set's high-water mark (Linux); return the resident KiB now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _status_kib("VmRSS") or 0


def _peak_rss_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(
    models: Sequence[str] = FAMILIES,
    modes: Sequence[str] = MODES,
    dtypes: Sequence[str] = ("bf16",),
    *,
    device: str | torch.device = "cpu",
    tiny: bool = False,
    repeats: int = 9,
    warmup: int = 2,
    memory: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """`{"rows": [...], "default_mode": ..., "steps": ...}`: per model, dtype, mode (and with
    `compile`, eager and compiled) the median step (ms), its ratio to fp32, to torch's best
    (`autocast+fusedadamw`) and to torch.autocast with the default AdamW, of that dtype and
    compilation, the peak memory (MiB, eager only) and how many of the `steps` steps each
    mode ran (warm-up included) were skipped (None for torch's modes: not told)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows: list[dict[str, Any]] = []
    for name in models:
        fam = family(name, tiny, device)
        cases: dict[tuple[str, str, bool], Any] = {}
        skipped: dict[tuple[str, str, bool], int | None] = {}
        for compiled in (False, True) if compile else (False,):
            for dt in dtypes:
                for mode in modes:
                    if _supported(mode, DTYPES[dt]) and (mode != "fp32" or dt == dtypes[0]):
                        step = build_step(fam, mode, DTYPES[dt], device, compiled)[1]
                        key = ("fp32" if mode == "fp32" else dt, mode, compiled)
                        cases[key] = (None, _counting_skips(step, key, skipped))
        times = side_by_side(cases, repeats=repeats, warmup=warmup, sync=sync)
        for (dt, mode, compiled), ms in times.items():
            fp32 = times.get(("fp32", "fp32", compiled))
            amp = times.get((dt, "autocast", compiled))
            best = times.get((dt, "autocast+fusedadamw", compiled))
            half = dt != "fp32"
            rows.append({
                "model": name, "mode": mode, "dtype": dt, "compiled": compiled,
                "ms": round(ms, 3),
                "vs_fp32": None if fp32 is None else round(ms / fp32, 3),
                "vs_best": None if best is None or not half else round(ms / best, 3),
                "vs_autocast": None if amp is None or not half else round(ms / amp, 3),
                "peak_mib": round(peak_mib(name, mode, dt, str(device), tiny), 1)
                if memory and not compiled else None,
                "skipped": skipped[(dt, mode, compiled)],
            })  # fmt: skip
        del cases
    return {"rows": rows, "default_mode": default_mode(), "steps": warmup + repeats}


def _counting_skips(
    step: Callable[[], bool | None], key: Any, skipped: dict[Any, int | None]
) -> Callable[[], None]:
    """`step`, counting into `skipped[key]` the calls that said they skipped the update."""
    skipped[key] = None

    def counted() -> None:
        applied = step()
        if applied is not None:
            skipped[key] = (skipped[key] or 0) + (not applied)

    return counted


def format_report(result: dict[str, Any], title: str) -> str:
    """One table: step time, ratios, peak memory per model and mode."""
    headers = ["model", "dtype", "mode", "compile", "ms", "x best", "x autocast", "x fp32",
               "peak MiB", "skipped"]  # fmt: skip
    rows = [
        [r["model"], r["dtype"], r["mode"], "yes" if r["compiled"] else "no", r["ms"],
         r["vs_best"], r["vs_autocast"], r["vs_fp32"], r["peak_mib"], r["skipped"]]
        for r in result["rows"]
    ]  # fmt: skip
    text = (
        f"{title}\n{format_table(headers, rows)}\n"
        "x best: the time over torch's best, autocast + AdamW(fused=True), of the same dtype "
        "and compilation; x autocast: over autocast with torch's default AdamW; skipped: of "
        f"the {result['steps']} steps each mode ran (warm-up included), those a non-finite "
        "gradient skipped (-: torch's modes do not tell)\n"
        f"default mode: {result['default_mode']}; target: default <= 0.9x best"
    )
    bad = [r for r in result["rows"] if r["skipped"]]
    for r in bad:
        text += (
            f"\nNOT A TRAINING STEP: {r['model']} {r['dtype']} {r['mode']}"
            f"{' compiled' if r['compiled'] else ''} skipped {r['skipped']} of "
            f"{result['steps']} steps (non-finite gradients): its time is a check and a skip"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mixprec bench step`."""
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=None,
        help="half dtypes (default: bf16 on cpu, fp16 and bf16 on cuda)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a quick smoke run")
    parser.add_argument("--repeats", type=positive_int, default=9, help="timed rounds (median)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--compile", action="store_true",
        help="also run every mode with its model under torch.compile (both sides)",
    )  # fmt: skip
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print; 0 on success, 2 if the device is missing."""
    apply_threads(args.threads)
    if cuda_missing(args.device):
        return 2
    dtypes = args.dtypes or (["fp16", "bf16"] if args.device.startswith("cuda") else ["bf16"])
    result = measure(
        args.models, args.modes, dtypes, device=args.device, tiny=args.tiny,
        repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory,
        compile=args.compile,
    )  # fmt: skip
    size = "tiny models" if args.tiny else "bench models"
    title = f"training step, median ms ({size}, {describe_machine()})"
    print_result(format_report(result, title), result, args.json)
    return 0
