"""The five model families of `mixprec bench step`, defined here so nothing is downloaded.

Shapes follow the originals (ResNet basic blocks with BatchNorm, ConvNeXt blocks with
LayerNorm2d and layer scale, a pre-LN ViT, a GPT with tied embeddings, a post-LN BERT with
a tied masked-LM head) at sizes one CPU thread trains in tens of milliseconds a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.cli.bench.models import GPT, ResNet, init_like_gpt2_

__all__ = ["FAMILIES", "Family", "LayerNorm2d", "family"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (a LayerNorm: kept fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, 4x MLP, layer scale, residual."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt: patchify stem, stages separated by LayerNorm2d + strided conv, head."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 2, 2), LayerNorm2d(dims[0])]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [_ConvNeXtBlock(d) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


class _EncoderBlock(nn.Module):
    """Transformer encoder block, pre-LN (ViT) or post-LN (BERT), GELU MLP."""

    def __init__(self, d: int, heads: int, pre_norm: bool) -> None:
        super().__init__()
        self.heads, self.pre_norm = heads, pre_norm
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self._attn(self.ln1(x))
            return x + self._mlp(self.ln2(x))
        x = self.ln1(x + self._attn(x))
        return self.ln2(x + self._mlp(x))


class ViT(nn.Module):
    """A ViT: conv patch embedding, class token, learned positions, pre-LN blocks, head."""

    def __init__(self, image: int, patch: int, d: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[_EncoderBlock(d, heads, True) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class BERT(nn.Module):
    """A BERT encoder: token, position and segment embeddings with LayerNorm, post-LN
    blocks, and a masked-LM head (dense, GELU, LayerNorm) tied to the token embedding;
    initialized as BERT is (`init_like_gpt2_`)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos, self.seg = (
            nn.Embedding(vocab, d),
            nn.Embedding(seq, d),
            nn.Embedding(2, d),
        )
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.Sequential(*[_EncoderBlock(d, heads, False) for _ in range(layers)])
        self.dense, self.head_ln = nn.Linear(d, d), nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.tok.weight
        init_like_gpt2_(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln(self.tok(idx) + self.pos(pos) + self.seg(torch.zeros_like(idx)))
        return self.decoder(self.head_ln(F.gelu(self.dense(self.blocks(x)))))


def _tied_gpt(vocab: int, d: int, heads: int, layers: int, seq: int) -> GPT:
    model = GPT(vocab, d, heads, layers, seq)
    model.head.weight = model.tok.weight
    return model


@dataclass
class Family:
    """A model factory, one synthetic batch (input, target) and its loss."""

    make: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _classify(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def _lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float().flatten(0, 1), y.flatten())


FAMILIES: tuple[str, ...] = ("resnet", "convnext", "vit", "gpt", "bert")


def family(name: str, tiny: bool = False, device: str | torch.device = "cpu") -> Family:
    """The `name` family (one of `FAMILIES`) at bench or `tiny` size, its batch on `device`."""
    g = torch.Generator().manual_seed(0)
    device = torch.device(device)
    if name in ("resnet", "convnext", "vit"):
        image, batch, classes = (16, 2, 10) if tiny else (16, 2, 100)
        if name == "resnet":
            widths = (8, 16) if tiny else (64, 128, 256, 512)  # resnet18's widths: 11.2M params
            make = lambda: ResNet((1,) * len(widths) if tiny else (2, 2, 2, 2), widths, False,  # noqa: E731
                                  classes, stem=8 if tiny else 64, imagenet_stem=False)  # fmt: skip
        elif name == "convnext":
            dims, depths = ((8, 16), (1, 1)) if tiny else ((64, 128, 256, 512), (1, 1, 3, 1))
            make = lambda: ConvNeXt(dims, depths, classes)  # noqa: E731
        else:
            d, layers = (16, 1) if tiny else (192, 6)
            make = lambda: ViT(image, 4, d, 4, layers, classes)  # noqa: E731
        x = torch.randn(batch, 3, image, image, generator=g).to(device)
        y = torch.randint(0, classes, (batch,), generator=g).to(device)
        return Family(make, x, y, _classify)
    if name in ("gpt", "bert"):
        vocab, d, layers, seq, batch = (64, 16, 1, 8, 2) if tiny else (4096, 256, 4, 64, 2)
        cls = _tied_gpt if name == "gpt" else BERT
        make = lambda: cls(vocab, d, 4, layers, seq)  # noqa: E731
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        if name == "gpt":
            return Family(make, tokens[:, :-1], tokens[:, 1:], _lm)
        return Family(make, tokens[:, :-1], tokens[:, :-1].roll(1, dims=1), _lm)
    raise ValueError(f"unknown model family {name!r}; expected one of {FAMILIES}.")
