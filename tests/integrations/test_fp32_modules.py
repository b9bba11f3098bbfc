"""Every front end keeps the same modules in fp32 (`model_to_half`'s rules: torch's norm
classes, a user's own `...Norm` class, an HF model's norms), seen from inside the forward."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mixprec import DataBunch, Learner, MixedPrecisionOptimizer


class ScaleNorm(nn.Module):
    """A norm layer of the user's own (matched by its class name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.mine = ScaleNorm(16)
        self.rms = LlamaRMSNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rms(self.mine(self.ln(self.inp(x)))))


EXPECTED = {
    "inp": torch.bfloat16,
    "ln": torch.float32,
    "mine": torch.float32,
    "rms": torch.float32,
    "out": torch.bfloat16,
}


def _watch(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of each watched module's first parameter during its forward."""
    seen: dict[str, torch.dtype] = {}
    for name in EXPECTED:
        module = model.get_submodule(name)

        def record(m, args, name=name):
            seen[name] = next(m.parameters()).dtype

        module.register_forward_pre_hook(record)
    return seen


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g))]


def plain_loop() -> dict[str, torch.dtype]:
    model = Net()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters()), model=model, dtype=torch.bfloat16
    )
    seen = _watch(model)
    x, y = _batches()[0]
    opt.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    assert opt.step()
    return seen


def learner(tmp_path) -> dict[str, torch.dtype]:
    model = Net()
    data = DataBunch(_batches(), _batches())
    learn = Learner(data, model, path=tmp_path).to_fp16(dtype=torch.bfloat16)
    seen = _watch(model)
    learn.fit(1)
    return seen


def lightning_trainer() -> dict[str, torch.dtype]:
    import lightning as L

    from mixprec.integrations.lightning import MixedPrecisionPlugin

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()
            self.seen = _watch(self.net)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    module = Module()
    trainer = L.Trainer(
        plugins=[MixedPrecisionPlugin(torch.bfloat16)], max_steps=1, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    x, y = _batches()[0]
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module.seen


def fabric() -> dict[str, torch.dtype]:
    import lightning as L

    from mixprec.integrations.lightning import MixedPrecisionPlugin

    net = Net()
    seen = _watch(net)
    fab = L.Fabric(accelerator="cpu", plugins=[MixedPrecisionPlugin(torch.bfloat16)])
    model, opt = fab.setup(net, torch.optim.AdamW(net.parameters()))
    x, y = _batches()[0]
    fab.backward(F.cross_entropy(model(x), y))
    assert opt.step()
    return seen


def accelerate_loop() -> dict[str, torch.dtype]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    net = Net()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(net.parameters()), model=net, dtype=torch.bfloat16
    )
    model, prepared = acc.prepare(net, opt)
    seen = _watch(net)
    x, y = _batches()[0]
    acc.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    prepared.step()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return seen


def hf_trainer(tmp_path) -> dict[str, torch.dtype]:
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainingArguments

    from mixprec.integrations.hf import MixedPrecisionCallback

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, x, labels):
            logits = self.net(x.bfloat16()).float()
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    model = Wrapped()
    opt = MixedPrecisionOptimizer(
        torch.optim.AdamW(model.parameters()), model=model, dtype=torch.bfloat16
    )
    seen = _watch(model.net)
    x, y = _batches()[0]
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = [{"x": x[i], "labels": y[i]} for i in range(4)]
    Trainer(model, args, train_dataset=data, optimizers=(opt, None),
            callbacks=[MixedPrecisionCallback()]).train()  # fmt: skip
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2_one_process() -> dict[str, torch.dtype]:
    fsdp = pytest.importorskip("mixprec.parallel.fsdp")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = Net()
        mesh = init_device_mesh("cpu", (1,))
        fsdp.fully_shard_half(model, torch.bfloat16, mesh=mesh)
        seen = _watch(model)
        x, _ = _batches()[0]
        model(x).float().sum().backward()
        return seen
    finally:
        dist.destroy_process_group()


FRONT_ENDS = ["plain loop", "Learner", "Lightning", "Fabric", "Accelerate", "HF Trainer", "FSDP2"]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_front_end_keeps_the_same_modules_fp32(front_end, tmp_path, monkeypatch):
    if front_end == "plain loop":
        seen = plain_loop()
    elif front_end == "Learner":
        seen = learner(tmp_path)
    elif front_end == "Lightning":
        seen = lightning_trainer()
    elif front_end == "Fabric":
        seen = fabric()
    elif front_end == "Accelerate":
        seen = accelerate_loop()
    elif front_end == "HF Trainer":
        seen = hf_trainer(tmp_path)
    else:
        monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
        seen = fsdp2_one_process()
    assert seen == EXPECTED
