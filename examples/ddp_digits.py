"""The digits CNN in fp16 with MixedPrecisionOptimizer under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_digits.py                  # 2 CPU processes, gloo
    torchrun --nproc_per_node=2 examples/ddp_digits.py --accumulate 2   # no_sync micro-batches
    python examples/ddp_digits.py                                       # one process, same code

Each rank trains on its own slice of every global batch; DDP all-reduces the half
gradients, and every rank steps or skips together. Rank 0 prints and writes the checkpoint.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F

from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.cli.demo.data import digits_cnn, digits_tensors
from mixprec.parallel.distributed import (
    accumulate,
    cleanup_distributed,
    init_distributed,
    save_on_rank0,
    unwrap,
    wrap_ddp,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Config:
    epochs: int = 4
    batch_size: int = 32  # per rank and per step, split into `accumulate` micro-batches
    accumulate: int = 1
    lr: float = 3e-3
    dtype: str = "fp16"
    seed: int = 0
    threads: int = 1  # per process
    save: str | None = None
    resume: str | None = None


def parse_args() -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(defaults).items():
        kind = str if value is None else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    config = Config(**vars(parser.parse_args()))
    if config.dtype not in DTYPES:
        parser.error(f"--dtype must be one of {list(DTYPES)}; got {config.dtype!r}")
    if config.accumulate < 1 or config.batch_size % config.accumulate:
        parser.error("--accumulate must be >= 1 and divide --batch-size")
    return config


def main(config: Config) -> None:
    env = init_distributed()  # gloo on CPU, NCCL on GPU; a no-op under plain python
    torch.set_num_threads(config.threads)
    dtype = DTYPES[config.dtype]
    x_train, y_train, x_valid, y_valid = digits_tensors(config.seed)

    torch.manual_seed(config.seed + env.rank)  # DDP copies rank 0's weights to every rank
    model = wrap_ddp(model_to_half(digits_cnn(), dtype))
    # the optimizer comes after DDP, so that every rank's fp32 masters start from rank 0's
    adamw = torch.optim.AdamW(model.parameters(), lr=config.lr)
    opt = MixedPrecisionOptimizer(adamw, "dynamic", flat_master=True)
    if config.resume:
        checkpoint = torch.load(config.resume, weights_only=True)  # on every rank
        unwrap(model).load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])

    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    if env.is_main:
        wire = f"; gradients all-reduced per step: {grad_bytes} bytes (fp32: {fp32_bytes})"
        print(
            f"{env.world_size} process(es), {config.dtype}, batch {config.batch_size} per rank "
            f"in {config.accumulate} micro-batch(es){wire if env.is_distributed else ''}"
        )

    global_batch = config.batch_size * env.world_size
    steps_per_epoch = len(y_train) // global_batch  # the same on every rank
    shuffle = torch.Generator().manual_seed(config.seed)  # the same order on every rank
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=shuffle)
        for step in range(steps_per_epoch):
            mine = order[step * global_batch : (step + 1) * global_batch].view(env.world_size, -1)
            micro_batches = mine[env.rank].chunk(config.accumulate)
            for idx in accumulate(model, micro_batches):  # no_sync() for all but the last
                loss = F.cross_entropy(model(x_train[idx].to(dtype)).float(), y_train[idx])
                opt.backward(loss / config.accumulate)
            opt.step()  # False on every rank when any rank overflowed
            opt.zero_grad()
        if env.is_main:
            accuracy = evaluate(unwrap(model), x_valid.to(dtype), y_valid)
            print(
                f"epoch {epoch}: loss {loss.item():.4f}  valid accuracy {accuracy:.4f}  "
                f"scale {opt.loss_scale:g}  skipped {opt.skipped_steps}  "
                f"{time.perf_counter() - start:.1f}s"
            )

    if env.is_distributed:
        masters = torch.cat([m.detach().reshape(-1) for g in opt.master_params for m in g])
        sums = [None] * env.world_size
        dist.all_gather_object(sums, masters.sum().item())
        if env.is_main:
            print(f"fp32 masters identical on every rank: {len(set(sums)) == 1}")
    if config.save:
        state = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict()}
        path = save_on_rank0(state, config.save)
        if env.is_main:
            print(f"saved {path}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


if __name__ == "__main__":
    try:
        main(parse_args())
    finally:
        cleanup_distributed()
