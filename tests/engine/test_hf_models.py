"""Tiny Hugging Face models built from configs (no downloads) under MixedPrecisionOptimizer:
norm layers and rotary buffers stay fp32, masters start from the exact fp32 weights, tied
embeddings follow one rule, and bf16 training tracks fp32."""

import copy

import pytest
import torch

from mixprec import MixedPrecisionOptimizer, PrecisionPolicy, model_to_half, plan
from mixprec.core.policy import HF_FP32_MODULES

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, STEPS = 100, 8, 5


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertForMaskedLM(config)


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def _build(name):
    torch.manual_seed(0)
    return MODELS[name]()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Norm")]


def _train(model, opt, steps=STEPS):
    batch, losses = _batch(), []
    for _ in range(steps):
        loss = model(**batch).loss.float()
        losses.append(loss.item())
        if isinstance(opt, MixedPrecisionOptimizer):
            opt.backward(loss)
            assert opt.step()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    losses.append(model(**batch).loss.float().item())
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_training_tracks_fp32_from_the_exact_weights(name):
    ref = _build(name)
    model = copy.deepcopy(ref)
    exact = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        model=model,
        dtype=torch.bfloat16,
        flat_master=name == "gpt2",
    )
    masters = {}
    names = dict(opt.param_names)
    for params, group in zip(opt.model_params, opt.master_params):
        views = group[0].detach().split([p.numel() for p in params]) if opt.flat_master else group
        masters.update({names[p]: v.detach().view_as(p) for p, v in zip(params, views)})
    assert masters.keys() == exact.keys()
    assert all(torch.equal(masters[n], exact[n]) for n in exact)  # bit for bit
    assert _norms(model) and {p.dtype for m in _norms(model) for p in m.parameters()} == {
        torch.float32
    }
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.dtype == torch.bfloat16
    for n, b in model.named_buffers():
        if n.endswith("inv_freq"):
            assert b.dtype == torch.float32, n
    fp32 = _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3))
    bf16 = _train(model, opt)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1], (fp32, bf16)


def test_llama_rotary_buffers_stay_fp32_and_the_forward_runs():
    model = _build("llama")
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    result = plan(model, dtype=torch.bfloat16)
    fates = {b.name: (b.dtype, b.rule) for b in result.buffers}
    assert fates["model.rotary_emb.inv_freq"] == (torch.float32, "buffer '*inv_freq'")
    assert set(fates) == {n for n, b in model.named_buffers() if b.is_floating_point()}
    rows = {m.name: m for m in result.modules}
    assert rows["model.layers.0.input_layernorm"].rule == "norm class name"
    model_to_half(model, torch.bfloat16)
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # exact, fp32
    out = model(**_batch())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    # The policy can cast it after all: the forward still runs (HF casts it to fp32 itself).
    other = model_to_half(_build("llama"), torch.bfloat16, PrecisionPolicy(fp32_buffers=()))
    assert other.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    assert torch.isfinite(other(**_batch()).loss)


def _dtype_of(model, name):
    return model.get_submodule(name).weight.dtype


@pytest.mark.parametrize("kept", ["lm_head", "transformer.wte"])
def test_a_tied_embedding_is_fp32_if_either_owner_is_kept_in_plan_and_conversion(kept):
    model = _build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    policy = PrecisionPolicy().keep(kept)
    rows = {m.name: m for m in plan(model, policy, torch.bfloat16).modules}
    other = "transformer.wte" if kept == "lm_head" else "lm_head"
    assert rows[other].dtype == torch.float32 and rows[other].rule.startswith(f"tied to {kept}")
    model_to_half(model, torch.bfloat16, policy)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _dtype_of(model, "lm_head") == _dtype_of(model, "transformer.wte") == torch.float32
    seen = {}
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].dtype))
    out = model(**_batch())
    assert seen["x"] == torch.bfloat16  # the residual stream stays half
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_by_default_the_tied_embedding_is_half_in_plan_and_conversion():
    model = _build("gpt2")
    rows = {m.name: m for m in plan(model, dtype=torch.bfloat16).modules}
    assert rows["transformer.wte"].dtype == torch.bfloat16 and "lm_head" not in {
        r.name for r in rows.values() if r.params
    }  # the shared weight is counted once, at its first owner
    model_to_half(model, torch.bfloat16)
    assert _dtype_of(model, "lm_head") == torch.bfloat16


def test_hf_keep_in_fp32_modules_is_honoured_under_fp16_and_can_be_dropped():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)  # declares ["wo"]
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    rows = {m.name: m for m in plan(model, dtype=torch.float16).modules}
    assert rows[wo].rule == "T5ForConditionalGeneration._keep_in_fp32_modules 'wo'"
    assert rows["encoder.final_layer_norm"].rule == "norm class name"  # T5LayerNorm
    assert rows[wo].dtype == torch.float32
    assert {m.name: m for m in plan(model, dtype=torch.bfloat16).modules}[wo].dtype == (
        torch.bfloat16  # as transformers does: the non-strict list applies to fp16 only
    )
    half = model_to_half(copy.deepcopy(model), torch.float16)
    assert half.get_submodule(wo).weight.dtype == torch.float32
    policy = PrecisionPolicy().without(HF_FP32_MODULES)
    dropped = model_to_half(copy.deepcopy(model), torch.float16, policy)
    assert dropped.get_submodule(wo).weight.dtype == torch.float16
