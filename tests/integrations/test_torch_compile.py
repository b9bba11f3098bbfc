"""torch.compile with mixprec (docs/torch-compile.md): compile then wrap, wrap then compile,
and the Learner on a compiled model train as the eager model does, in one graph.

The graphs are captured by a counting backend that runs them as captured (no code
generation), so the compiled runs must match eager bit for bit; inductor's timings and
numbers are measured by benchmarks/trainers_side_by_side.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch, Learner, MixedPrecisionOptimizer

STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(STEPS)]  # fmt: skip


def train(model: nn.Module, opt: MixedPrecisionOptimizer) -> list[torch.Tensor]:
    """`STEPS` plain steps; returns the fp32 masters."""
    for x, y in batches():
        loss = nn.functional.cross_entropy(model(x.bfloat16()).float(), y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    return [m.detach().clone() for group in opt.master_params for m in group]


def wrapped(model: nn.Module) -> MixedPrecisionOptimizer:
    return MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, dtype=torch.bfloat16
    )


def eager_masters() -> list[torch.Tensor]:
    model = mlp()
    return train(model, wrapped(model))


def test_wrap_then_compile_trains_as_eager_in_one_graph():
    model = mlp()
    opt = wrapped(model)  # converts the model to bf16, LayerNorm fp32
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    masters = train(compiled, opt)
    assert all(torch.equal(a, b) for a, b in zip(masters, eager_masters(), strict=True))
    assert counter.frame_count == 1  # one graph: no graph break, no recompile


def test_compile_then_wrap_trains_as_eager_in_one_graph():
    counter = CompileCounter()
    compiled = torch.compile(mlp(), backend=counter)
    opt = wrapped(compiled)  # converts the compiled module's parameters in place
    assert compiled._orig_mod[0].weight.dtype == torch.bfloat16
    masters = train(compiled, opt)
    assert all(torch.equal(a, b) for a, b in zip(masters, eager_masters(), strict=True))
    assert counter.frame_count == 1


def learner(model: nn.Module, tmp_path) -> Learner:
    x, y = (torch.cat(t) for t in zip(*batches()))
    data = DataBunch(DataLoader(TensorDataset(x, y), batch_size=16),
                     DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))  # fmt: skip
    learn = Learner(data, model, path=tmp_path, progress=False)
    learn.to_fp16(dtype=torch.bfloat16)
    return learn


def test_the_learner_on_a_compiled_model_fits_as_on_the_eager_one(tmp_path):
    counter = CompileCounter()
    compiled = torch.compile(mlp(), backend=counter)
    learn = learner(compiled, tmp_path / "compiled")
    learn.fit(1)
    eager = learner(mlp(), tmp_path / "eager")
    eager.fit(1)
    got, want = learn.opt.master_values(), eager.opt.master_values()
    assert all(torch.equal(a, b) for a, b in zip(got.values(), want.values(), strict=True))
    assert learn.validate() == eager.validate()
    assert counter.frame_count <= 2  # training and evaluation mode: one graph each
