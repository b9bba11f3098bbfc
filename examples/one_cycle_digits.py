"""The digits CNN (bf16 on the Learner) with fit_one_cycle against a constant lr, from one seed:
the validation accuracy after each epoch, and the lr the finder suggests.

    python examples/one_cycle_digits.py --epochs 1,2,4 --lr 3e-3 --max-lr 1e-2
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch, Learner, accuracy
from mixprec.cli.demo.data import digits_cnn, digits_tensors


def learner(seed: int, batch_size: int) -> Learner:
    x_train, y_train, x_valid, y_valid = digits_tensors(seed)
    torch.manual_seed(seed)
    data = DataBunch(
        DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x_valid, y_valid), batch_size=512),
        device="cpu",
    )
    learn = Learner(data, digits_cnn(), metrics=[accuracy], progress=False)
    return learn.to_fp16(dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="1,2,4", help="comma-separated run lengths")
    parser.add_argument("--lr", type=float, default=3e-3, help="the constant lr")
    parser.add_argument("--max-lr", type=float, default=1e-2, help="fit_one_cycle's max_lr")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = learner(args.seed, args.batch_size).lr_find()
    print(f"lr_find: suggestion {found.suggestion:.2e}, lr_min {found.lr_min:.2e}")
    print(
        f"{'epochs':>6} {'constant ' + format(args.lr, 'g'):>16} {'one-cycle ' + format(args.max_lr, 'g'):>18}"
    )
    for epochs in (int(e) for e in args.epochs.split(",")):
        constant = learner(args.seed, args.batch_size)
        constant.fit(epochs, args.lr)
        cycle = learner(args.seed, args.batch_size)
        cycle.fit_one_cycle(epochs, args.max_lr)
        print(f"{epochs:>6} {constant.validate()[1]:>16.4f} {cycle.validate()[1]:>18.4f}")


if __name__ == "__main__":
    main()
