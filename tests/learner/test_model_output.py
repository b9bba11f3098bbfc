"""Hugging Face models as they are: a tiny GPT-2 (2 layers, hidden 32, vocab 100, sequences of
8, built from a config: no download) takes dict batches as keywords, trains on `model_loss`
with `accuracy` on its ModelOutput, validates, saves, loads and resumes bit for bit; its own
loss is used when it returns one; a bad metric or loss is found at the first batch."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from helpers.learner import assert_identical, snapshot
from mixprec import Callback, DataBunch, Learner, accuracy
from mixprec.learner.model_output import logits_of, model_loss

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 8


def gpt2(seed: int = 0) -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def counting(n: int, seed: int, labels: bool = False) -> list:
    """Sequences counting up from a random token (mod VOCAB): the next token is learnable."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    seqs = (starts + torch.arange(SEQ + 1)) % VOCAB
    items = []
    for s in seqs:
        x = {"input_ids": s[:SEQ], "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        if labels:
            x["labels"] = s[:SEQ]  # the model shifts them itself
        items.append((x, s[1:]))
    return items


def data(labels: bool = False) -> DataBunch:
    train = DataLoader(counting(64, 0, labels), batch_size=16, shuffle=True)
    return DataBunch(train, DataLoader(counting(32, 1, labels), batch_size=16), device="cpu")


def make(path, **kwargs) -> Learner:
    learn = Learner(
        data(), gpt2(), loss_func=model_loss, metrics=[accuracy], path=path, progress=False
    )
    return learn.to_fp16(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    learn = make(path)
    before = learn.validate()
    torch.manual_seed(0)
    learn.fit_one_cycle(4, 1e-2)
    learn.save("gpt2")
    after_save = snapshot(learn)
    learn.fit(1, 1e-3)
    return {"path": path, "learn": learn, "before": before, "saved": after_save}


def test_a_gpt2_trains_on_dict_batches_and_validates(trained):
    learn, before = trained["learn"], trained["before"]
    loss, acc = learn.validate()
    assert before[1] < 0.1 and before[0] > 4  # random: ~1/100 of the next tokens
    assert acc > 0.5 and loss < before[0] - 1
    assert learn.recorder.val_losses[-1] == pytest.approx(loss)
    x, _ = next(iter(learn.data.valid_dl))  # a dict of (16, SEQ) tensors
    out = learn.predict(x)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (16, SEQ, VOCAB)


def test_a_gpt2_checkpoint_loads_and_resumes_bit_for_bit(trained):
    learn = make(trained["path"]).load("gpt2")
    assert_identical(snapshot(learn), trained["saved"], "loaded")
    learn.fit(1, 1e-3)
    assert_identical(snapshot(learn), snapshot(trained["learn"]), "resumed")


def test_the_models_own_loss_is_used_when_it_returns_one(tmp_path):
    learn = Learner(data(labels=True), gpt2(), loss_func=model_loss, progress=False)
    (valid_loss,) = learn.validate()
    batches = list(learn.data.valid_dl)
    learn.model.eval()  # no dropout, as in validate()
    with torch.no_grad():
        expected = sum(learn.model(**x).loss for x, _ in batches) / len(batches)
    assert valid_loss == pytest.approx(expected.item(), rel=1e-6)


def test_a_callback_that_takes_the_logits_adapts_validation_too(tmp_path):
    class Logits(Callback):
        def on_loss_begin(self, last_output, **kwargs):
            return last_output.logits

    def flat_ce(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    plain = Learner(data(), gpt2(), loss_func=model_loss, metrics=[accuracy], progress=False)
    learn = Learner(
        data(), gpt2(), loss_func=flat_ce, metrics=[accuracy], callbacks=[Logits()], progress=False
    )
    assert learn.validate() == pytest.approx(plain.validate(), rel=1e-6)
    x, _ = next(iter(learn.data.valid_dl))
    assert torch.equal(learn.predict(x), plain.predict(x).logits)


def test_a_bad_metric_or_loss_is_found_at_the_first_batch(tmp_path):
    def top1(output, target):  # forgets that the output is a ModelOutput
        return (output.argmax(-1) == target).float().mean()

    learn = Learner(data(), gpt2(), metrics=[accuracy, top1], progress=False)
    before = snapshot(learn.to_fp16(dtype=torch.bfloat16))
    with pytest.raises(
        TypeError, match="loss_func cross_entropy failed on the model's output, a Causal"
    ):
        learn.fit(1)
    learn.loss_func = model_loss
    with pytest.raises(TypeError, match="metric top1 failed on the first training batch"):
        learn.fit(1)
    assert learn.iteration == 0 and learn.recorder.steps == 0
    assert_identical(snapshot(learn), before)
    assert logits_of(torch.ones(2)).shape == (2,)
