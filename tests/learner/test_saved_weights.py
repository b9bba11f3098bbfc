"""A Learner checkpoint's "model" entry holds the fp32 masters under parameter names, and the
masters rebuilt from it on load are the saved ones, in any memory format."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch, Learner


def _learner(path, seed):
    torch.manual_seed(seed)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    dl = DataLoader(TensorDataset(x, y), batch_size=8)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 3),
    ).to(memory_format=torch.channels_last)  # fmt: skip
    learn = Learner(DataBunch(dl, dl), model, path=path, progress=False)
    return learn.to_fp16(dtype=torch.bfloat16, flat_master=True)


def _masters(learn):
    return [m.detach().clone() for group in learn.opt.master_params for m in group]


def test_flat_channels_last_masters_come_back_as_saved(tmp_path):
    learn = _learner(tmp_path, 0)
    learn.fit(1, 1e-2)
    saved = _masters(learn)
    learn.save("ckpt")
    entry = torch.load(tmp_path / "models" / "ckpt.pth", weights_only=True)["model"]
    for name, _ in learn.model.named_parameters():
        assert entry[name].dtype == torch.float32, name
    other = _learner(tmp_path, 1)
    other.fit(1, 1e-2)  # builds the wrapper, with other masters
    other.load("ckpt")
    for a, b in zip(_masters(other), saved):
        assert torch.equal(a, b)
    weight = other.model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight.float(), entry["0.weight"].to(torch.bfloat16).float())
