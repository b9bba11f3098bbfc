"""A tiny GAN in fp16: two optimizers, two losses, each scaled and scheduled on its own.

The generator learns to turn noise into samples of a 1-D Gaussian. At step
`--inject-inf-at` the discriminator's loss is multiplied by inf: the discriminator skips
that step (its scale backs off, its LR schedule stays put) while the generator steps as
usual. With --dtype fp32 nothing checks for overflow and the inf poisons the discriminator
(its weights turn nan): the loss scaler's check is what makes the skip possible.
Run:  PYTHONPATH=src python examples/gan.py
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mixprec import MixedPrecisionOptimizer, Stepper, model_to_half

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Config:
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    noise_dim: int = 4
    real_mean: float = 4.0
    real_std: float = 1.25
    inject_inf_at: int = 100  # -1: never
    dtype: str = "fp16"
    seed: int = 0


def mlp(n_in: int, n_out: int, width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, width), nn.LeakyReLU(0.2), nn.Linear(width, n_out))


def make_stepper(model: nn.Module, config: Config) -> Stepper:
    """A Stepper over `model`: Adam on fp32 masters with its own dynamic scale, and a decay."""
    opt: torch.optim.Optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(0.5, 0.999)
    )
    if DTYPES[config.dtype] != torch.float32:
        opt = MixedPrecisionOptimizer(opt, "dynamic", init_scale=2.0**12)
    return Stepper(opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.997))


def train(config: Config) -> dict[str, float]:
    """Train the GAN; return the generated and real statistics and each side's skipped steps."""
    dtype = DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    generator, discriminator = mlp(config.noise_dim, 1), mlp(1, 1)
    if dtype != torch.float32:
        model_to_half(generator, dtype)
        model_to_half(discriminator, dtype)
    g, d = make_stepper(generator, config), make_stepper(discriminator, config)
    ones = torch.ones(config.batch_size, 1)
    zeros = torch.zeros(config.batch_size, 1)
    for step in range(config.steps):
        real = torch.randn(config.batch_size, 1) * config.real_std + config.real_mean
        fake = generator(torch.randn(config.batch_size, config.noise_dim, dtype=dtype))

        # Discriminator: real -> 1, fake -> 0. Losses in fp32 (the outputs are cast up).
        d_real = discriminator(real.to(dtype)).float()
        d_fake = discriminator(fake.detach()).float()
        d_loss = F.binary_cross_entropy_with_logits(d_real, ones)
        d_loss = d_loss + F.binary_cross_entropy_with_logits(d_fake, zeros)
        if step == config.inject_inf_at:
            d_loss = d_loss * math.inf  # every discriminator gradient becomes inf/nan
        d_applied = d.step(d_loss)

        # Generator: make the discriminator say 1. Its backward also runs through D.
        g_loss = F.binary_cross_entropy_with_logits(discriminator(fake).float(), ones)
        g_applied = g.step(g_loss)
        if step == config.inject_inf_at:
            print(f"step {step}: inf injected: discriminator applied={d_applied}, "
                  f"generator applied={g_applied}")  # fmt: skip

    with torch.no_grad():
        samples = generator(torch.randn(4096, config.noise_dim, dtype=dtype)).float()
    return {
        "generated_mean": samples.mean().item(),
        "generated_std": samples.std().item(),
        "real_mean": config.real_mean,
        "real_std": config.real_std,
        "d_skipped": d.skipped_steps,
        "g_skipped": g.skipped_steps,
        "d_lr": d.optimizer.param_groups[0]["lr"],
        "g_lr": g.optimizer.param_groups[0]["lr"],
        "d_scale": getattr(d.optimizer, "loss_scale", 1.0),
        "g_scale": getattr(g.optimizer, "loss_scale", 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--inject-inf-at", type=int, default=defaults.inject_inf_at)
    parser.add_argument("--dtype", choices=list(DTYPES), default=defaults.dtype)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny kernels: one thread is faster
    result = train(
        Config(steps=args.steps, inject_inf_at=args.inject_inf_at, dtype=args.dtype, seed=args.seed)
    )
    print(
        f"real      mean {result['real_mean']:.2f} std {result['real_std']:.2f}\n"
        f"generated mean {result['generated_mean']:.2f} std {result['generated_std']:.2f}\n"
        f"discriminator: {result['d_skipped']} skipped, scale {result['d_scale']:g}, "
        f"lr {result['d_lr']:.3g}\n"
        f"generator:     {result['g_skipped']} skipped, scale {result['g_scale']:g}, "
        f"lr {result['g_lr']:.3g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
