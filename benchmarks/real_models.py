"""Tiny real-model architectures trained in fp32, in bf16 master mode and in bf16 autocast.

    PYTHONPATH=src python benchmarks/real_models.py --steps 20

HF transformers GPT-2, BERT and Llama are built from configs (2 layers, hidden 32, vocab 100,
sequence 8; no download); the ResNet, ConvNeXt and ViT are the timm-style modules of
tests/helpers/timm_style.py. Each trains on one fixed batch with AdamW from the same
initial weights, and the table gives the loss after N steps in each precision, plus the
dtypes that master mode leaves the norm layers, float buffers and residual stream in.
Master mode hands the residual stream on in bf16 (a kept norm layer's output is cast back
to half); autocast leaves it fp32 (only matmuls and convolutions run in half).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from helpers import timm_style  # noqa: E402
from mixprec import AutocastOptimizer, MixedPrecisionOptimizer  # noqa: E402
from mixprec.core.policy import is_norm  # noqa: E402

VOCAB, SEQ = 100, 8


def hf_models() -> dict:
    import transformers as T

    llama = T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    gpt2 = T.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    bert = T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    return {
        "gpt2": lambda: T.GPT2LMHeadModel(gpt2),
        "bert": lambda: T.BertForMaskedLM(bert),
        "llama": lambda: T.LlamaForCausalLM(llama),
    }


def _loss_fn(name: str):
    g = torch.Generator().manual_seed(1)
    if name in ("gpt2", "bert", "llama"):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        return lambda model, dtype: model(input_ids=ids, labels=ids).loss.float()
    x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,), generator=g)
    return lambda model, dtype: F.cross_entropy(model(x.to(dtype)).float(), y)


SECOND_BLOCK = {
    "gpt2": "transformer.h.1",
    "bert": "bert.encoder.layer.1",
    "llama": "model.layers.1",
    "resnet": "4",
    "convnext": "stages.1",
    "vit": "blocks.1",
}


def _residual_dtype(name: str, model: torch.nn.Module, run) -> str:
    """The dtype that enters the second block (the residual stream), seen by a hook."""
    block = model.get_submodule(SECOND_BLOCK[name])
    seen: dict = {}

    def hook(module, args):
        seen.setdefault("x", args[0].dtype)

    handle = block.register_forward_pre_hook(hook)
    run()
    handle.remove()
    return str(seen.get("x", "?")).removeprefix("torch.")


def train(name: str, build, steps: int, lr: float) -> dict:
    torch.manual_seed(0)
    base = build()
    loss_of = _loss_fn(name)
    out: dict = {"model": name, "steps": steps}
    for mode in ("fp32", "master", "autocast"):
        model = copy.deepcopy(base)
        inner = torch.optim.AdamW(model.parameters(), lr=lr)
        dtype = torch.float32
        region = None
        if mode == "master":
            opt = MixedPrecisionOptimizer(inner, model=model, dtype=torch.bfloat16)
            dtype = torch.bfloat16
        elif mode == "autocast":
            opt = AutocastOptimizer(inner, dtype=torch.bfloat16)
            region = opt.autocast
        else:
            opt = inner

        def loss(model=model, dtype=dtype, region=region):
            if region is None:
                return loss_of(model, dtype)
            with region():
                return loss_of(model, dtype)

        for _ in range(steps):
            value = loss()
            if mode == "fp32":
                value.backward()
                opt.step()
            else:
                opt.backward(value)
                opt.step()
            opt.zero_grad()
        with torch.no_grad():
            out[f"{mode}_loss"] = round(loss().item(), 5)
        out[f"{mode}_residual"] = _residual_dtype(name, model, loss)
        if mode == "master":
            norms = {p.dtype for m in model.modules() if is_norm(m) for p in m.parameters()}
            out["norm_dtypes"] = sorted(str(d).removeprefix("torch.") for d in norms)
            out["buffers"] = {
                n: str(b.dtype).removeprefix("torch.")
                for n, b in model.named_buffers()
                if b.is_floating_point()
            }
    out["master_minus_fp32"] = round(out["master_loss"] - out["fp32_loss"], 5)
    out["autocast_minus_fp32"] = round(out["autocast_loss"] - out["fp32_loss"], 5)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    builders = {**hf_models(), **timm_style.MODELS}
    rows = [
        train(name, build, args.steps, 1e-3 if name in ("gpt2", "bert", "llama") else 1e-2)
        for name, build in builders.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"loss after {args.steps} AdamW steps on one fixed batch, same initial weights")
    print(
        "| model | fp32 loss | bf16 master | bf16 autocast | master - fp32 | autocast - fp32 "
        "| residual stream (master / autocast) | norm dtypes | float buffers |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        buffers = ", ".join(f"{n.rsplit('.', 1)[-1]}: {d}" for n, d in r["buffers"].items())
        buffers = buffers if len(buffers) < 80 else f"{len(r['buffers'])} BatchNorm stats: fp32"
        print(
            f"| {r['model']} | {r['fp32_loss']:.4f} | {r['master_loss']:.4f} | "
            f"{r['autocast_loss']:.4f} | {r['master_minus_fp32']:+.4f} | "
            f"{r['autocast_minus_fp32']:+.4f} | {r['master_residual']} / "
            f"{r['autocast_residual']} | {', '.join(r['norm_dtypes'])} | {buffers or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
