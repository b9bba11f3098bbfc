"""Benchmark models: a GPT-2-like transformer and a ResNet-like CNN, any size, no extra deps."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "GPT", "ResNet", "gpt2_small", "init_like_gpt2_", "resnet50_like", "tiny_gpt", "tiny_resnet",
]  # fmt: skip


def init_like_gpt2_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialize `model` in place as GPT-2 and BERT are: every Linear and Embedding weight
    normal(0, `std`), biases zero (LayerNorms keep ones and zeros).

    torch's defaults (an Embedding of N(0, 1), tied to the output layer) give logits of
    standard deviation ~sqrt(d): softmax probabilities underflow to 1e-38, Adam's first
    moments decay into subnormal floats within a few steps, and a CPU step then times the
    subnormal penalty (the step of either side grew by half within ten steps)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-like language model: token + position embeddings, blocks, LayerNorm, head,
    initialized as GPT-2 is (`init_like_gpt2_`)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        init_like_gpt2_(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class _Residual(nn.Module):
    """A ResNet block: basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1), BatchNorm, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        mid = c_out // 4 if bottleneck else c_out
        convs = (
            [(c_in, mid, 1, 1), (mid, mid, 3, stride), (mid, c_out, 1, 1)]
            if bottleneck
            else [(c_in, mid, 3, stride), (mid, c_out, 3, 1)]
        )
        layers: list[nn.Module] = []
        for i, (a, b, k, s) in enumerate(convs):
            layers += [nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b)]
            if i < len(convs) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks (the first of each stage strided), head."""

    def __init__(
        self, blocks: tuple[int, ...], widths: tuple[int, ...], bottleneck: bool, classes: int,
        stem: int = 64, imagenet_stem: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        k, s = (7, 2) if imagenet_stem else (3, 1)
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, k, s, k // 2, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
        ]  # fmt: skip
        if imagenet_stem:
            layers.append(nn.MaxPool2d(3, 2, 1))
        c = stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(_Residual(c, w, 2 if j == 0 and i > 0 else 1, bottleneck))
                c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def gpt2_small(seq: int = 1024) -> GPT:
    """GPT-2 small's shape: 12 layers, d=768, 12 heads, 50257 tokens (124M parameters)."""
    return GPT(50257, 768, 12, 12, seq)


def resnet50_like(classes: int = 1000) -> ResNet:
    """ResNet-50's shape: bottleneck stages of 3, 4, 6, 3 blocks (25.6M parameters)."""
    return ResNet((3, 4, 6, 3), (256, 512, 1024, 2048), bottleneck=True, classes=classes)


def tiny_gpt(seq: int = 64) -> GPT:
    """A two-layer GPT for quick CPU runs."""
    return GPT(256, 128, 4, 2, seq)


def tiny_resnet(classes: int = 10) -> ResNet:
    """A small CIFAR-style ResNet (basic blocks) for quick CPU runs."""
    return ResNet((2, 2), (32, 64), bottleneck=False, classes=classes, stem=32, imagenet_stem=False)
