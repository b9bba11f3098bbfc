"""BatchNorm in a half model: fp32 weights and statistics, half input kept for backward."""

import pytest
import torch
from torch import nn

from mixprec import model_to_half
from mixprec.cli.bench.memory import saved_bytes


def _block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_takes_the_half_input_and_matches_the_fp32_input_path(dtype):
    torch.manual_seed(0)
    block = model_to_half(_block(), dtype)
    bn = block[1]
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float32
    seen = []
    bn.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.randn(4, 3, 6, 6).to(dtype)
    out = block(x)
    assert seen == [(dtype, dtype)] and out.dtype == dtype
    reference = nn.functional.batch_norm(  # what an fp32 input gives, rounded to half
        block[0](x).float(), bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
        bn.bias, training=True,
    ).relu().to(dtype)  # fmt: skip
    torch.testing.assert_close(
        out, reference, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0
    )


def test_batchnorm_input_is_saved_in_half():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    block = model_to_half(_block())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x.half())
    activations = [(d, n) for d, n in saved if n >= x.numel()]  # not weights or statistics
    assert len(activations) == 3  # conv input, BatchNorm input, ReLU output
    assert all(d == torch.float16 for d, _ in activations)
    assert saved_bytes(block, x.half()) <= 0.52 * saved_bytes(_block(), x)
