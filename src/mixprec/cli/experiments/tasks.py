"""The parity tasks: the digits CNN, and a small transformer sorting sequences made in code."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.cli.demo.data import digits_cnn, digits_tensors
from mixprec.cli.experiments.loop import Task, Tensors

__all__ = ["SortTransformer", "digits_task", "sort_data", "sort_task"]


def _class_correct(output: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    return int((output.argmax(dim=-1) == target).sum()), target.numel()


def _token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def digits_task(*, tiny: bool = False) -> Task:
    """scikit-learn's 8x8 digits (1437 train / 360 valid) and the demo CNN."""

    def data(seed: int) -> Tensors:
        x_train, y_train, x_valid, y_valid = digits_tensors(seed)
        if tiny:
            return x_train[:128], y_train[:128], x_valid[:64], y_valid[:64]
        return x_train, y_train, x_valid, y_valid

    return Task(
        name="digits",
        make_model=lambda: digits_cnn(width=4 if tiny else 16),
        make_data=data,
        loss_func=F.cross_entropy,
        correct=_class_correct,
        epochs=1 if tiny else 10,
        batch_size=64,
        lr=3e-3,
        chance=1 / 10,
    )


def sort_data(seed: int, n_train: int, n_valid: int, length: int = 8, vocab: int = 16) -> Tensors:
    """Random token sequences (B, length) in [0, vocab) and the same sequences sorted."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randint(0, vocab, (n_train + n_valid, length), generator=generator)
    y = x.sort(dim=1).values
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class SortTransformer(nn.Module):
    """A pre-norm transformer encoder mapping each position to the token sorted into it."""

    def __init__(
        self, vocab: int = 16, length: int = 8, dim: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, L) int64 -> (B, L, dim) in the model's dtype -> logits (B, L, vocab)
        h = self.embed(tokens) + self.position
        return self.head(self.norm(self.encoder(h)))


def sort_task(*, tiny: bool = False) -> Task:
    """Sort 8 tokens from a vocabulary of 16; accuracy is the share of tokens put right."""
    n_train, n_valid = (256, 128) if tiny else (6144, 1024)
    dim, layers = (16, 1) if tiny else (64, 2)
    return Task(
        name="sort",
        make_model=lambda: SortTransformer(dim=dim, layers=layers),
        make_data=lambda seed: sort_data(seed, n_train, n_valid),
        loss_func=_token_loss,
        correct=_class_correct,
        epochs=1 if tiny else 6,
        batch_size=64 if tiny else 128,
        lr=3e-3,
        chance=1 / 16,
    )
