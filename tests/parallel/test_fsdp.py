"""mixprec.parallel.fsdp in one process: `scaled_step` beside torch.amp.GradScaler, and the argument
checks of `fully_shard_half`. FSDP2 itself runs on 2 processes in test_distributed_e2e.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec import LossScaler

fsdp = pytest.importorskip("mixprec.parallel.fsdp", reason="needs torch's FSDP2 (fully_shard)")


def _run(step_fn) -> tuple[list[bool], list[float], torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    applied, scales = [], []
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        applied.append(step_fn(model, opt, loss, poison=step == 1))
        scales.append(step_fn.scale())
        opt.zero_grad()
    return applied, scales, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _Ours:
    def __init__(self, clip: float | None) -> None:
        self.scaler = LossScaler("dynamic", init_scale=2.0**10, growth_interval=2)
        self.clip = clip

    def __call__(self, model, opt, loss, poison: bool) -> bool:
        self.scaler.scale_loss(loss).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        return fsdp.scaled_step(opt, self.scaler, clip=self.clip)

    def scale(self) -> float:
        return self.scaler.scale


class _Torch:
    def __init__(self, clip: float | None) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        self.clip = clip

    def __call__(self, model, opt, loss, poison: bool) -> bool:
        self.scaler.scale(loss).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        self.scaler.unscale_(opt)
        if self.clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        before = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def scale(self) -> float:
        return self.scaler.get_scale()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_scaled_step_matches_grad_scaler(clip: float | None) -> None:
    ours = _run(_Ours(clip))
    theirs = _run(_Torch(clip))
    assert ours[0] == [True, False, True, True, True]
    assert ours[:2] == theirs[:2]
    assert torch.equal(ours[2], theirs[2])


def test_fully_shard_half_rejects_its_own_policy_and_full_precision() -> None:
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.float16)
    with pytest.raises(TypeError, match="sets mp_policy itself"):
        fsdp.fully_shard_half(nn.Linear(2, 2), mp_policy=policy)
    with pytest.raises(ValueError, match="dtype must be one of"):
        fsdp.fully_shard_half(nn.Linear(2, 2), torch.float32)
