"""`mixprec train`: the digits CNN in fp32, fp16 and bf16 from one seed, side by side."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..convert import model_to_half
from ..optimizer import MixedPrecisionOptimizer
from .data import digits_cnn, digits_tensors

__all__ = ["PRECISIONS", "RunResult", "TrainConfig", "train_digits"]

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    loss_scale: str = "dynamic"
    flat_master: bool = True


@dataclass
class RunResult:
    precision: str
    accuracy: float
    seconds: float
    skipped_steps: int
    loss_scale: float | None
    final_loss: float


def _loss_scale(text: str) -> float | str:
    return text if text == "dynamic" else float(text)


def train_digits(precision: str, config: TrainConfig) -> RunResult:
    """Train the digits CNN in `precision` with a plain loop; return its validation figures."""
    dtype = PRECISIONS[precision]
    x_train, y_train, x_valid, y_valid = digits_tensors(config.seed)
    torch.manual_seed(config.seed)
    model = digits_cnn()
    mixed = dtype != torch.float32
    if mixed:
        model_to_half(model, dtype)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    if mixed:
        optimizer = MixedPrecisionOptimizer(
            optimizer, _loss_scale(config.loss_scale), flat_master=config.flat_master
        )
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for batch in order.split(config.batch_size):
            output = model(x_train[batch].to(dtype))
            loss = F.cross_entropy(output.float(), y_train[batch])
            if isinstance(optimizer, MixedPrecisionOptimizer):
                optimizer.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return RunResult(
        precision=precision,
        accuracy=_accuracy(model, x_valid.to(dtype), y_valid),
        seconds=round(seconds, 3),
        skipped_steps=getattr(optimizer, "skipped_steps", 0),
        loss_scale=getattr(optimizer, "loss_scale", None),
        final_loss=round(loss.item(), 5),
    )


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def format_table(results: list[RunResult]) -> str:
    """The runs as a fixed-width table."""
    header = f"{'precision':<10}{'accuracy':>10}{'seconds':>10}{'skipped':>9}{'loss scale':>12}"
    rows = [header, "-" * len(header)]
    for r in results:
        scale = "-" if r.loss_scale is None else f"{r.loss_scale:g}"
        rows.append(
            f"{r.precision:<10}{r.accuracy:>10.4f}{r.seconds:>10.2f}{r.skipped_steps:>9}{scale:>12}"
        )
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--loss-scale", default=defaults.loss_scale, help='"dynamic" or a number (static)'
    )
    parser.add_argument(
        "--precisions",
        default="fp32,fp16,bf16",
        help=f"comma-separated, from {', '.join(PRECISIONS)}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(
            f"mixprec train: unknown precision {unknown}; choose from {list(PRECISIONS)}"
        )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        loss_scale=args.loss_scale,
    )
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    results = [train_digits(p, config) for p in precisions]
    if args.json:
        print(json.dumps({"runs": [asdict(r) for r in results]}))
    else:
        print(format_table(results))
    return 0
