"""A module trained with MixedPrecisionPlugin can be validated, tested, predicted and fitted
again, by the same or a new Trainer, with the same or a new plugin."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning")

from torch.nn import functional as F

from helpers.lightning_modules import Tiny, tiny_loader, trainer
from mixprec.integrations.lightning import MixedPrecisionPlugin


class Evaluated(Tiny):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("again", ["same trainer", "new trainer", "new plugin"])
def test_validate_test_predict_and_fit_again_after_fit(again):
    module = Evaluated()
    plugin = MixedPrecisionPlugin()
    t = trainer(plugin, max_steps=2)
    t.fit(module, tiny_loader())
    after_fit = _params(module)
    assert all(p.dtype == torch.float32 for p in after_fit)
    (metrics,) = t.validate(module, tiny_loader(n=8))
    assert 0 < metrics["val_loss"] < 10
    (metrics,) = t.test(module, tiny_loader(n=8))
    assert 0 < metrics["test_loss"] < 10
    (out,) = t.predict(module, tiny_loader(n=8))
    assert out.dtype == torch.float32 and out.shape[0] == 8
    assert all(torch.equal(a, b) for a, b in zip(after_fit, _params(module)))  # exact masters

    if again == "same trainer":
        t.fit_loop.epoch_loop.max_steps = 4
        t.fit(module, tiny_loader())
        assert t.global_step == 4
    else:
        second = plugin if again == "new trainer" else MixedPrecisionPlugin()
        t2 = trainer(second, max_steps=2)
        t2.fit(module, tiny_loader())
        assert t2.global_step == 2
        assert second.optimizer.skipped_steps == 0
    assert not all(torch.equal(a, b) for a, b in zip(after_fit, _params(module)))
    assert all(p.dtype == torch.float32 for p in module.parameters())
