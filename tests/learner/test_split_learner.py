"""`learn.to_fp16(dtype=torch.bfloat16, master="split")`: the fp32-master Learner's numbers
with 2-byte masters, through fits, checkpoints in both directions and back to fp32."""

import pytest
import torch

from helpers.learner import make_learner
from mixprec import MixedPrecisionOptimizer

BF16 = {"dtype": torch.bfloat16, "loss_scale": "dynamic"}


def _masters(learn) -> list[torch.Tensor]:
    opt = learn.opt
    assert isinstance(opt, MixedPrecisionOptimizer)
    values = opt.master_values()
    return [values[id(p)].clone() for p in learn.model.parameters()]


def _fit(learn, epochs: int = 1, seed: int = 0) -> None:
    torch.manual_seed(seed)  # the same shuffles for every learner compared
    learn.fit(epochs, lr=1e-2)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)


@pytest.mark.parametrize("fused", [None, True], ids=["grads_at_backward_end", "lean"])
def test_split_masters_fit_as_fp32_masters_bit_for_bit(tmp_path, fused):
    fp32 = make_learner(tmp_path).to_fp16(**BF16, fused=fused)
    split = make_learner(tmp_path).to_fp16(**BF16, fused=fused, master="split")
    assert split.opt.split is not None and split.model[0].weight.dtype == torch.bfloat16
    _same(_masters(split), _masters(fp32))  # both start from the exact fp32 weights
    for learn in (fp32, split):
        _fit(learn, 2)
    _same(_masters(split), _masters(fp32))
    for p, q in zip(split.model.parameters(), fp32.model.parameters()):
        assert torch.equal(p, q)
    assert split.opt.scaler.steps == fp32.opt.scaler.steps == 8


def test_checkpoints_move_between_split_and_fp32_masters_and_resume_exactly(tmp_path):
    straight = make_learner(tmp_path).to_fp16(**BF16, fused=True)
    _fit(straight)
    _fit(straight, seed=1)
    split = make_learner(tmp_path).to_fp16(**BF16, fused=True, master="split")
    _fit(split)
    split.save("split")
    resumed = make_learner(tmp_path).to_fp16(**BF16, fused=True).load("split")
    _fit(resumed, seed=1)  # the fp32-master learner continues the split one's run
    assert resumed.opt.scaler.steps == 8
    back = make_learner(tmp_path).to_fp16(**BF16, fused=True, master="split").load("split")
    _fit(back, seed=1)
    for learn in (resumed, back):
        for p, q in zip(learn.model.parameters(), straight.model.parameters()):
            assert torch.equal(p, q)
    _same(_masters(back), _masters(straight))
    saved = torch.load(tmp_path / "models" / "split.pth", weights_only=True)
    assert saved["model"]["0.weight"].dtype == torch.float32  # the masters, not the weights


def test_to_fp32_takes_the_exact_masters_and_keeps_the_optimizer_state(tmp_path):
    learn = make_learner(tmp_path).to_fp16(**BF16, master="split")
    _fit(learn)
    masters = _masters(learn)
    moments = [learn.opt.optimizer.state[p]["exp_avg"].clone() for p in learn.model.parameters()]
    learn.to_fp32()
    _same([p.detach() for p in learn.model.parameters()], masters)
    for p, m in zip(learn.model.parameters(), moments):
        assert torch.equal(learn.opt.state[p]["exp_avg"], m)
    _fit(learn)  # plain fp32 training goes on from there
