"""A tiny Hugging Face GPT-2 (2 layers, hidden 32, vocab 100, sequences of 8; built from a
config, no download) on the Learner in bf16, without a wrapper module: trained with
fit_one_cycle, validated, saved, loaded into a fresh learner and resumed.

    python examples/hf_gpt2.py --epochs 4 --max-lr 1e-2
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from torch.utils.data import DataLoader

from mixprec import DataBunch, Learner, accuracy
from mixprec.learner.model_output import model_loss

VOCAB, SEQ = 100, 8


def counting(n: int, seed: int) -> list:
    """Sequences counting up from a random token (mod VOCAB): the next token is learnable."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    seqs = (starts + torch.arange(SEQ + 1)) % VOCAB
    mask = torch.ones(SEQ, dtype=torch.long)
    return [({"input_ids": s[:SEQ], "attention_mask": mask}, s[1:]) for s in seqs]


def learner(path: str) -> Learner:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, use_cache=False,
        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
    )  # fmt: skip
    torch.manual_seed(0)
    data = DataBunch(
        DataLoader(counting(64, 0), batch_size=16, shuffle=True),
        DataLoader(counting(32, 1), batch_size=16),
        device="cpu",
    )
    learn = Learner(
        data,
        transformers.GPT2LMHeadModel(config),
        loss_func=model_loss,
        metrics=[accuracy],
        path=path,
        progress=False,
    )
    return learn.to_fp16(dtype=torch.bfloat16)


def show(what: str, learn: Learner) -> None:
    loss, acc = learn.validate()
    print(f"{what:<20} valid_loss {loss:.4f}  accuracy {acc:.4f}  skipped steps "
          f"{learn.recorder.skipped_steps}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-lr", type=float, default=1e-2)
    args = parser.parse_args()
    path = tempfile.mkdtemp()
    learn = learner(path)
    show("before training", learn)
    learn.fit_one_cycle(args.epochs, args.max_lr)
    show("after fit_one_cycle", learn)
    learn.save("gpt2")
    learn.fit(1, 1e-3)
    resumed = learner(path).load("gpt2")
    resumed.fit(1, 1e-3)
    show("one more epoch", learn)
    show("saved, loaded, +1", resumed)
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            [m for g in learn.opt.master_params for m in g],
            [m for g in resumed.opt.master_params for m in g],
        )
    )
    print(f"resumed masters bit-identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
