"""Tiny HF models built from configs (random weights, no downloads) and token data for the
HF Trainer, Accelerate and PEFT tests."""

from __future__ import annotations

import torch
import transformers
from accelerate.state import AcceleratorState, GradientState

from test_docs import ROOT, python_blocks

VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 with 32-wide embeddings and random weights."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama with 32-wide hidden states and random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def token_data(n: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """`n` examples of `SEQ` tokens with a learnable pattern (each token repeats the last)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, VOCAB, (n, SEQ // 2), generator=g)
    ids = first.repeat_interleave(2, dim=1)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state, so the next Accelerator starts fresh."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def masters_by_name(model: torch.nn.Module, opt) -> dict[str, torch.Tensor]:
    """Each trainable parameter's fp32 master, by the parameter's name (copies)."""
    values = opt.master_values()
    return {n: values[id(p)].clone() for n, p in model.named_parameters() if id(p) in values}


def moments(opt) -> list[torch.Tensor]:
    """Copies of every tensor in the wrapped optimizer's state."""
    return [
        v.clone()
        for state in opt.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    ]


def drift(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], init: dict) -> float:
    """How far the weights `got` lie from `ref`, relative to how far training moved `ref`
    from `init` (all by parameter name)."""
    apart = sum(float((got[n] - ref[n]).square().sum()) for n in init) ** 0.5
    moved = sum(float((ref[n] - init[n]).square().sum()) for n in init) ** 0.5
    return apart / moved


def run_doc_blocks(page: str, runner: str, tmp_path, monkeypatch) -> int:
    """Run, as tests/test_docs.py runs a block, each ```python block of docs/`page` marked
    `<!-- not-run: ... run by <runner> -->`; return how many ran."""
    text = (ROOT / "docs" / page).read_text()
    lines = text.splitlines()
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line, code, runnable in python_blocks(text):
        marker = next(s for s in reversed(lines[: line - 1]) if s.strip())
        if runnable or f"run by {runner}" not in marker:
            continue
        reset_accelerate()
        torch.manual_seed(0)
        exec(compile(code, f"docs/{page}:{line}", "exec"), {"__name__": "__main__"})
        ran += 1
    reset_accelerate()
    return ran
