"""mixprec beside each trainer's own bf16: HF Trainer, Accelerate, PEFT LoRA, torch.compile.

    PYTHONPATH=src python benchmarks/trainers_side_by_side.py --steps 30 [--only hf]

Tiny models built from configs (random weights, no download): GPT-2 (2 layers, width 32,
vocab 64) for the Trainer and Accelerate, Llama (2 layers, width 32) for LoRA, a small MLP
for torch.compile's timings. Every run starts from the same weights and data (16 sequences
of 16 tokens, batches of 4, AdamW lr 1e-2, linear lr decay, clipping at 1.0). Printed as
markdown tables, one per trainer; the docs pages quote them.

Rows: the loss logged at the last step; the grad norm the trainer clips and logs at step 1;
the same with 2 micro-batches of 2 accumulated (it should equal the batch of 4); what an
inf put into one weight's gradient at step 3 does (weights finite after it, steps skipped,
lr scheduler steps taken in all); the dtype and size of the weights a checkpoint holds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import safetensors.torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from helpers.hf import tiny_gpt2, tiny_llama, token_data  # noqa: E402
from mixprec import DataBunch, Learner, MixedPrecisionOptimizer  # noqa: E402
from mixprec.integrations.accelerate import MixedPrecisionAccelerator  # noqa: E402
from mixprec.integrations.hf import MixedPrecisionCallback, MixedPrecisionTrainer  # noqa: E402

INF_STEP = 3  # the step whose gradient gets an inf (1-based)


def fresh_accelerate() -> None:
    """Each run builds its own Accelerator; Accelerate keeps one state per process."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def inf_hook(model: torch.nn.Module, when: Callable[[], bool]) -> None:
    weight = model.transformer.h[0].mlp.c_fc.weight
    weight.register_hook(lambda g: torch.full_like(g, math.inf) if when() else g)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(title: str, columns: list[str], rows: dict[str, list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(fmt(v) for v in values) + " |")


def saved_weights(path: Path) -> str:
    """'dtype, KiB' of the weights file in `path`."""
    tensors = safetensors.torch.load_file(path)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return f"{'/'.join(dtypes)}, {path.stat().st_size / 1024:.0f} KiB"


# -- HF Trainer -------------------------------------------------------------------------
HF_SETUPS = ["fp32", "Trainer(bf16=True)", "Trainer + mixprec bf16", "MixedPrecisionTrainer bf16"]


class InjectInf(TrainerCallback):
    def __init__(self) -> None:
        self.active = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step == INF_STEP - 1


def hf_run(setup: str, steps: int, out: Path, inf: bool = False, accumulate: int = 1) -> dict:
    fresh_accelerate()
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cls, callbacks = Trainer, []
    if "mixprec" in setup or "MixedPrecision" in setup:
        opt = MixedPrecisionOptimizer(opt, model=model, dtype=torch.bfloat16)
        if setup.startswith("Trainer"):
            callbacks.append(MixedPrecisionCallback())
        else:
            cls = MixedPrecisionTrainer
    injector = InjectInf()
    if inf:
        callbacks.append(injector)
        inf_hook(model, lambda: injector.active)
    args = TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, max_steps=steps,
        per_device_train_batch_size=4 // accumulate, gradient_accumulation_steps=accumulate,
        learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=steps,
        disable_tqdm=True, bf16=setup == "Trainer(bf16=True)", logging_nan_inf_filter=False,
    )  # fmt: skip
    trainer = cls(model, args, train_dataset=token_data(), optimizers=(opt, None),
                  callbacks=callbacks)  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the tables only
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "loss": logs[-1]["loss"],
        "norm1": logs[0]["grad_norm"],
        "finite": weights_finite(model),
        "skipped": getattr(opt, "skipped_steps", 0),
        "sched": trainer.lr_scheduler.last_epoch,
        "ckpt": saved_weights(out / f"checkpoint-{steps}" / "model.safetensors"),
    }


def hf_table(steps: int) -> None:
    rows: dict[str, list[object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in HF_SETUPS:
            plain = hf_run(setup, steps, Path(tmp) / f"{setup}-plain")
            acc = hf_run(setup, steps, Path(tmp) / f"{setup}-acc", accumulate=2)
            bad = hf_run(setup, steps, Path(tmp) / f"{setup}-inf", inf=True)
            for name, value in [
                (f"loss at step {steps}", plain["loss"]),
                ("grad_norm logged at step 1 (clipped to 1.0)", plain["norm1"]),
                ("the same, 2 micro-batches of 2 accumulated", acc["norm1"]),
                (f"loss at step {steps}, accumulated", acc["loss"]),
                (f"inf at step {INF_STEP}: weights finite after", bad["finite"]),
                (f"inf at step {INF_STEP}: steps skipped", bad["skipped"]),
                (f"inf at step {INF_STEP}: lr scheduler steps of {steps}", bad["sched"]),
                (f"inf at step {INF_STEP}: loss at step {steps}", bad["loss"]),
                ("checkpoint model.safetensors", plain["ckpt"]),
            ]:
                rows.setdefault(name, []).append(value)
    table(f"HF Trainer, tiny GPT-2, {steps} steps", HF_SETUPS, rows)


# -- Accelerate ---------------------------------------------------------------------------
ACC_SETUPS = [
    "fp32",
    'Accelerator("bf16")',
    'Accelerator("no") + mixprec bf16',
    "MixedPrecisionAccelerator bf16",
]


def acc_run(setup: str, steps: int, out: Path, inf: bool = False, accumulate: int = 1) -> dict:
    fresh_accelerate()
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if "mixprec" in setup or "MixedPrecision" in setup:
        opt = MixedPrecisionOptimizer(opt, model=model, dtype=torch.bfloat16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    cls = MixedPrecisionAccelerator if setup.startswith("MixedPrecision") else Accelerator
    accelerator = cls(
        mixed_precision="bf16" if setup == 'Accelerator("bf16")' else "no",
        cpu=True, gradient_accumulation_steps=accumulate,
    )  # fmt: skip
    data = token_data() * math.ceil(steps / 4)
    loader = DataLoader(data[: 4 * steps], batch_size=4 // accumulate)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    step = 1
    inf_hook(model, lambda: inf and step == INF_STEP)
    norms, losses, skipped, sched_steps = [], [], 0, 0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(float(loss))
        if accelerator.sync_gradients:
            skipped += accelerator.optimizer_step_was_skipped
            step += 1
    sched_steps = sched.scheduler.last_epoch
    accelerator.save_state(str(out))
    engine = getattr(opt, "optimizer", None)
    return {
        "loss": statistics.fmean(losses[-accumulate:]),
        "norm1": norms[0],
        "finite": weights_finite(model),
        "skipped": getattr(engine, "skipped_steps", 0),
        "told": skipped,
        "sched": sched_steps,
        "ckpt": saved_weights(out / "model.safetensors"),
    }


def acc_table(steps: int) -> None:
    rows: dict[str, list[object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, setup in enumerate(ACC_SETUPS):
            plain = acc_run(setup, steps, Path(tmp) / f"{i}-plain")
            acc = acc_run(setup, steps, Path(tmp) / f"{i}-acc", accumulate=2)
            bad = acc_run(setup, steps, Path(tmp) / f"{i}-inf", inf=True)
            for name, value in [
                (f"loss at step {steps}", plain["loss"]),
                ("clip_grad_norm_ at step 1 (max 1.0)", plain["norm1"]),
                ("the same, accumulate() over 2 micro-batches of 2", acc["norm1"]),
                (f"loss at step {steps}, accumulated", acc["loss"]),
                (f"inf at step {INF_STEP}: weights finite after", bad["finite"]),
                (f"inf at step {INF_STEP}: steps the engine skipped", bad["skipped"]),
                (f"inf at step {INF_STEP}: optimizer_step_was_skipped seen", bad["told"]),
                (f"inf at step {INF_STEP}: lr scheduler steps of {steps}", bad["sched"]),
                ("save_state model.safetensors", plain["ckpt"]),
            ]:
                rows.setdefault(name, []).append(value)
    table(f"Accelerate, tiny GPT-2, {steps} steps", ACC_SETUPS, rows)


# -- PEFT LoRA ----------------------------------------------------------------------------
PEFT_SETUPS = ["fp32", "bf16 base, fp32 adapters, Trainer(bf16=True)", "mixprec bf16"]


def lora_model(setup: str):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    if setup.startswith("bf16 base"):
        base = base.to(torch.bfloat16)  # the usual: base loaded in bf16
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    # peft keeps the adapters fp32 on a bf16 base (autocast_adapter_dtype=True)
    return get_peft_model(base, config)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(trainable elements, bytes of their weights + fp32 masters + optimizer state, bytes of
    the gradients a backward leaves)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    total = sum(p.numel() * p.element_size() for p in trainable)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    inner = opt.optimizer if isinstance(opt, MixedPrecisionOptimizer) else opt
    if isinstance(opt, MixedPrecisionOptimizer):
        total += sum(m.numel() * m.element_size() for g in opt.master_params for m in g)
    for state in inner.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)
                     and v.dim())  # fmt: skip
    return n, total, grads


def peft_run(setup: str, steps: int, out: Path) -> dict:
    fresh_accelerate()
    model = lora_model(setup)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    callbacks = []
    if setup.startswith("mixprec"):
        opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
        )
        callbacks.append(MixedPrecisionCallback())
    grads = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:  # the gradients of the first backward, before the step
                grads["bytes"] = state_bytes(model, opt)[2]

    args = TrainingArguments(
        output_dir=str(out), report_to=[], use_cpu=True, max_steps=steps,
        per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", disable_tqdm=True, bf16=setup.startswith("bf16 base"),
    )  # fmt: skip
    trainer = Trainer(model, args, train_dataset=token_data(), optimizers=(opt, None),
                      callbacks=[*callbacks, Measure()])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    n, total, _ = state_bytes(model, opt)
    state = opt.fp32_state_dict() if isinstance(opt, MixedPrecisionOptimizer) else None
    model.save_pretrained(out / "adapter", state_dict=state)
    base = model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "loss": logs[-1]["loss"],
        "base": str(base).removeprefix("torch."),
        "state": total / n,
        "grads": grads["bytes"] / n,
        "saved": saved_weights(out / "adapter" / "adapter_model.safetensors"),
    }


def peft_table(steps: int) -> None:
    rows: dict[str, list[object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, setup in enumerate(PEFT_SETUPS):
            r = peft_run(setup, steps, Path(tmp) / str(i))
            for name, value in [
                (f"loss at step {steps}", r["loss"]),
                ("frozen base weights", r["base"]),
                ("bytes per trainable parameter: weights, masters, AdamW state", r["state"]),
                ("bytes per trainable parameter: gradients", r["grads"]),
                ("adapter_model.safetensors", r["saved"]),
            ]:
                rows.setdefault(name, []).append(value)
    table(f"PEFT LoRA (r=4 on q, v), tiny Llama, HF Trainer, {steps} steps", PEFT_SETUPS, rows)


# -- torch.compile ------------------------------------------------------------------------
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024), nn.GELU(),
                         nn.Linear(1024, 1024), nn.LayerNorm(1024), nn.GELU(),
                         nn.Linear(1024, 16))  # fmt: skip


def compile_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 256, generator=g), torch.randint(0, 16, (64,), generator=g))
            for _ in range(steps)]  # fmt: skip


COMPILE_MODES = ("eager", "compile then wrap", "wrap then compile")


def no_compile_cache() -> None:
    """Every compile from scratch: no column reuses another's cached graphs."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


class CompiledRun:
    """One way of combining torch.compile and mixprec, stepped one step at a time."""

    def __init__(self, mode: str, steps: int) -> None:
        model = mlp()
        if mode == "compile then wrap":
            model = torch.compile(model)
        self.opt = MixedPrecisionOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, dtype=torch.bfloat16
        )
        self.model = torch.compile(model) if mode == "wrap then compile" else model
        self.batches = iter(compile_batches(steps))
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self) -> None:
        x, y = next(self.batches)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(self.model(x.bfloat16()).float(), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.times.append(time.perf_counter() - start)
        self.loss = loss.item()


def compile_runs(steps: int) -> dict[str, CompiledRun]:
    """Eager and both compiled orders; after each one's first (compiling) step, the steps
    take turns, so a busy machine slows them alike (the median hides the one step where
    the first compiled model finds its graph dropped by the second's reset)."""
    runs = {mode: CompiledRun(mode, steps) for mode in COMPILE_MODES}
    for run in runs.values():
        torch._dynamo.reset()  # the two orders compile the same graph: each from scratch
        run.step()
    for _ in range(steps - 1):
        for run in runs.values():
            run.step()
    return runs


def learner_run(compiled: bool, steps: int) -> dict:
    torch._dynamo.reset()
    model = mlp()
    if compiled:
        model = torch.compile(model)
    x, y = (torch.cat(t) for t in zip(*compile_batches(steps)))
    ds = torch.utils.data.TensorDataset(x, y)
    data = DataBunch(DataLoader(ds, batch_size=64), DataLoader(ds, batch_size=64))
    with tempfile.TemporaryDirectory() as tmp:
        learn = Learner(data, model, path=tmp, progress=False)
        learn.to_fp16(dtype=torch.bfloat16)
        start = time.perf_counter()
        learn.fit(1)
        seconds = time.perf_counter() - start
    return {"loss": learn.recorder.losses[-1], "first": seconds}


def graph_breaks(make: Callable[[], torch.nn.Module], convert: bool) -> str:
    torch._dynamo.reset()
    model = make()
    if convert:
        MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), model=model,
                                dtype=torch.bfloat16)  # fmt: skip
    ids = torch.stack([row["input_ids"] for row in token_data()[:4]])
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    return f"graphs: {explained.graph_count}, breaks: {explained.graph_break_count}"


def compile_table(steps: int) -> None:
    no_compile_cache()
    runs = compile_runs(steps)
    median = {mode: 1000 * statistics.median(run.times[1:]) for mode, run in runs.items()}
    rows: dict[str, list[object]] = {
        f"loss at step {steps}": [run.loss for run in runs.values()],
        "first step, s (compiles)": [run.times[0] for run in runs.values()],
        "median step after it, ms": list(median.values()),
        "step time / eager": [m / median["eager"] for m in median.values()],
    }
    columns = list(runs)
    table(f"torch.compile (inductor), MLP 256-1024-1024-16, batch 64, bf16, {steps} steps",
          columns, rows)  # fmt: skip
    eager, compiled = learner_run(False, steps), learner_run(True, steps)
    table(f"Learner.fit(1) ({steps} steps), same MLP", ["eager", "torch.compile(model)"], {
        "last loss": [eager["loss"], compiled["loss"]],
        "fit seconds (compiled: incl. compiling)": [eager["first"], compiled["first"]],
    })  # fmt: skip
    table("Graphs torch._dynamo.explain finds in one forward", ["fp32", "converted to bf16"], {
        "tiny GPT-2": [graph_breaks(tiny_gpt2, False), graph_breaks(tiny_gpt2, True)],
        "tiny Llama": [graph_breaks(tiny_llama, False), graph_breaks(tiny_llama, True)],
    })  # fmt: skip


SECTIONS = {"hf": hf_table, "accelerate": acc_table, "peft": peft_table, "compile": compile_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.only or list(SECTIONS):
        SECTIONS[name](args.steps)


if __name__ == "__main__":
    main()
