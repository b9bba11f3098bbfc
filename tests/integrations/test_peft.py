"""The LoRA recipe (docs/peft.md) on a tiny Llama with peft: fp32 masters for the adapters
only, the frozen base in bf16, training that follows fp32 LoRA, and fp32 adapters saved from
the masters."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import Trainer, TrainingArguments

from helpers.hf import (
    drift,
    masters_by_name,
    reset_accelerate,
    run_doc_blocks,
    tiny_llama,
    token_data,
)
from mixprec import MixedPrecisionOptimizer
from mixprec.integrations.hf import MixedPrecisionCallback

STEPS = 4


def lora(seed: int = 0) -> PeftModel:
    """A tiny Llama with rank-4 LoRA adapters on the attention's q and v projections."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(seed), config)
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; random B makes every adapter weight move
            torch.nn.init.normal_(p, std=0.02)
    return model


def wrapped(model: PeftModel) -> MixedPrecisionOptimizer:
    return MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )


def trained(model: PeftModel, opt: torch.optim.Optimizer) -> list[float]:
    """Losses of `STEPS` plain steps on batches of 4."""
    data = token_data()
    losses = []
    for i in range(STEPS):
        batch = {k: torch.stack([row[k] for row in data[4 * i : 4 * i + 4]]) for k in data[0]}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def test_masters_only_for_the_adapters_and_the_base_in_bf16():
    model = lora()
    opt = wrapped(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masters = sum(m.numel() for group in opt.master_params for m in group)
    assert masters == trainable
    assert all(m.dtype == torch.float32 for group in opt.master_params for m in group)
    base = model.base_model.model.model.layers[0]
    assert base.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.mlp.up_proj.weight.dtype == torch.bfloat16
    assert base.input_layernorm.weight.dtype == torch.float32  # norm layers stay fp32


def test_lora_trains_like_fp32_lora():
    ref = lora()
    ref_losses = trained(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2))
    model = lora()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = wrapped(model)
    losses = trained(model, opt)
    assert losses == pytest.approx(ref_losses, abs=0.02)
    ref_adapters = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    assert drift(masters_by_name(model, opt), ref_adapters, init) < 0.15


def test_fp32_adapters_saved_from_the_masters(tmp_path):
    model = lora()
    opt = wrapped(model)
    trained(model, opt)
    state = opt.fp32_state_dict()
    adapters = get_peft_model_state_dict(model, state_dict=state)
    model.save_pretrained(tmp_path, state_dict=state)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(adapters) and len(saved) == 8  # A and B of q and v, 2 layers
    by_id = opt.master_values()
    named = dict(model.named_parameters())
    for key, value in saved.items():
        assert value.dtype == torch.float32
        name = next(n for n in named if n.startswith(key.removesuffix(".weight")))
        assert torch.equal(value, by_id[id(named[name])]), key
    # An fp32 copy of the base loads the adapters as the masters hold them.
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), by_id[id(named[name])]), name


def test_lora_under_the_hf_trainer(tmp_path):
    """The stock Trainer with MixedPrecisionCallback trains the adapters of a bf16 base."""
    reset_accelerate()
    model = lora()
    opt = wrapped(model)
    base_before = model.base_model.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    adapters_before = masters_by_name(model, opt)
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model, args, train_dataset=token_data(), optimizers=(opt, None),
        callbacks=[MixedPrecisionCallback()],
    )  # fmt: skip
    trainer.train()
    reset_accelerate()
    assert torch.equal(model.base_model.model.model.layers[0].mlp.up_proj.weight, base_before)
    after = masters_by_name(model, opt)
    assert all(not torch.equal(after[n], adapters_before[n]) for n in after)
    assert opt.skipped_steps == 0


def test_the_docs_page_runs_as_written(tmp_path, monkeypatch):
    page, runner = "peft.md", "tests/integrations/test_peft.py"
    assert run_doc_blocks(page, runner, tmp_path, monkeypatch) == 1
    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 8 and {t.dtype for t in saved.values()} == {torch.float32}
