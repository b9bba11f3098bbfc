"""DataBunch: batch transforms and device placement."""

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch
from mixprec.learner.data import to_device


def _bunch() -> DataBunch:
    ds = TensorDataset(torch.arange(8.0).reshape(4, 2), torch.arange(4))
    return DataBunch(DataLoader(ds, batch_size=2), DataLoader(ds, batch_size=4), device="cpu")


def test_transforms_apply_in_order_to_both_loaders_until_removed():
    data = _bunch()

    def add_one(b):
        return b[0] + 1, b[1]

    def double(b):
        return b[0] * 2, b[1]

    data.add_tfm(add_one)
    data.add_tfm(double)
    (x, _), *_ = data.train_dl
    assert torch.equal(x, (torch.tensor([[0.0, 1], [2, 3]]) + 1) * 2)
    (xv, _), *_ = data.valid_dl
    assert torch.equal(xv[:2], x)
    data.remove_tfm(add_one)
    data.remove_tfm(add_one)  # absent: ignored
    (x, _), *_ = data.train_dl
    assert torch.equal(x, torch.tensor([[0.0, 1], [2, 3]]) * 2)
    assert len(data.train_dl) == 2 and len(data.valid_dl) == 1


def test_add_tfm_rejects_non_callables():
    with pytest.raises(TypeError, match="a batch transform must be callable"):
        _bunch().add_tfm(3)


def test_batches_are_moved_to_the_device_nested_structures_included():
    Pair = namedtuple("Pair", "a b")
    batch = ({"x": torch.ones(2), "n": 3}, [Pair(torch.zeros(1), "s")])
    moved = to_device(batch, torch.device("meta"))
    assert moved[0]["x"].is_meta and moved[0]["n"] == 3
    assert isinstance(moved[1][0], Pair) and moved[1][0].a.is_meta and moved[1][0].b == "s"
    data = DataBunch([(torch.ones(2), torch.zeros(2))], device="meta")
    (x, y), *_ = data.train_dl
    assert x.is_meta and y.is_meta
    assert data.valid_dl is None
