"""Gradient accumulation against one large batch: the max abs difference of the fp32 weights
after training each way, per dtype, in one process or under torchrun (DDP, `no_sync`).

    python examples/accumulate_vs_large_batch.py --micro-batch 8 --accumulate 4 --epochs 2
    torchrun --standalone --nproc_per_node=2 examples/accumulate_vs_large_batch.py \\
        --micro-batch 4 --accumulate 2 --epochs 1
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch, Learner, cleanup_distributed

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(batch_size: int, accumulate: int, epochs: int, dtype: torch.dtype | None) -> Learner:
    """An MLP 8-32-4 (no BatchNorm: its statistics are per micro-batch), AdamW at lr 1e-2."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = DataBunch(
        DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True), device="cpu"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    learn = Learner(data, model, progress=False, accumulate=accumulate)
    if dtype is not None:
        learn.to_fp16(dtype=dtype)
    torch.manual_seed(1)  # the same shuffling for every run
    learn.fit(epochs, 1e-2)
    return learn


def weights(learn: Learner) -> torch.Tensor:
    groups = getattr(learn.opt, "master_params", None) or [list(learn.model.parameters())]
    return torch.cat([p.detach().float().reshape(-1) for g in groups for p in g])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=8, help="per process")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = []
    for name, dtype in DTYPES.items():
        large = train(args.micro_batch * args.accumulate, 1, args.epochs, dtype)
        accumulated = train(args.micro_batch, args.accumulate, args.epochs, dtype)
        diff = (weights(accumulated) - weights(large)).abs().max().item()
        lines.append(f"{name}  max |accumulated - large batch| {diff:.1e}  ({large.ranks})")
    if large.ranks.is_main:
        print("\n".join(lines))
    cleanup_distributed()


if __name__ == "__main__":
    main()
