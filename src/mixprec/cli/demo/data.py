"""scikit-learn's bundled 8x8 handwritten digits (no download) as tensors, and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_cnn", "digits_tensors"]


def digits_tensors(
    seed: int = 0, valid_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return `(x_train, y_train, x_valid, y_valid)`: images (N, 1, 8, 8) in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_valid = train_test_split(
        range(len(y)), test_size=valid_fraction, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_valid], y[idx_valid]


def digits_cnn(width: int = 16) -> nn.Module:
    """A conv-BN-ReLU network for 1x8x8 images and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, 10),
    )
