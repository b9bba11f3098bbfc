"""The digits CNN under Lightning: mixprec's MixedPrecisionPlugin beside Lightning's own precision.

    python examples/lightning_digits.py                        # the table of docs/lightning.md
    python examples/lightning_digits.py --json results.json    # also the numbers as JSON
    python examples/lightning_digits.py --only mixprec-bf16 --epochs 1

For each setting: validation accuracy after `--epochs` epochs and seconds per epoch (the fastest
epoch after the first: the least disturbed by other work on the machine); then the
same run with an inf injected into one gradient (conv1's weight) at step `--inf-step`: was that
step applied, are the weights finite at the end, the accuracy then; and what a checkpoint
saved by `trainer.save_checkpoint` holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mixprec.cli.demo.data import digits_cnn, digits_tensors
from mixprec.integrations.lightning import MixedPrecisionPlugin

SETTINGS: dict[str, dict[str, Any]] = {
    "mixprec-bf16": {"plugins": [lambda: MixedPrecisionPlugin(torch.bfloat16)]},
    "mixprec-bf16-autocast": {"plugins": [lambda: MixedPrecisionPlugin(mode="autocast")]},
    "mixprec-fp16": {"plugins": [lambda: MixedPrecisionPlugin(torch.float16)]},
    "lightning-bf16-mixed": {"precision": "bf16-mixed"},
    "lightning-16-mixed": {"precision": "16-mixed"},
    "lightning-32-true": {"precision": "32-true"},
}


@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    inf_step: int = 5
    seed: int = 0
    threads: int = 1
    only: str = ""  # comma-separated setting names; all when empty
    json: str = ""  # write the results here too


class DigitsModule(L.LightningModule):
    """The digits CNN with AdamW; `inf_step` puts an inf into conv1's weight gradient."""

    def __init__(self, lr: float, inf_step: int | None) -> None:
        super().__init__()
        self.net = digits_cnn()
        self.lr = lr
        self.inf_step = inf_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def on_after_backward(self) -> None:
        if self.global_step == self.inf_step:
            self.net[0].weight.grad.view(-1)[0] = float("inf")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class Watch(L.Callback):
    """Epoch times, and whether the step at `inf_step` changed the weights."""

    def __init__(self, inf_step: int | None) -> None:
        self.inf_step = inf_step
        self.epoch_times: list[float] = []
        self.inf_step_applied: bool | None = None
        self._before: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_times.append(time.perf_counter() - self._t)

    def _weights(self, trainer) -> list[torch.Tensor]:
        groups = trainer.optimizers[0].param_groups  # the fp32 masters under mixprec's plugin
        return [p.detach().clone() for g in groups for p in g["params"]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.inf_step:
            self._before = self._weights(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._before and self.inf_step_applied is None:
            after = self._weights(trainer)
            self.inf_step_applied = not all(torch.equal(a, b) for a, b in zip(self._before, after))


def accuracy(module: L.LightningModule, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return (module(x).argmax(1) == y).float().mean().item()


def trainer_for(setting: str, epochs: int, watch: Watch) -> L.Trainer:
    spec = SETTINGS[setting]
    kwargs: dict[str, Any] = {"precision": spec.get("precision", "32-true")}
    if "plugins" in spec:
        kwargs = {"plugins": [make() for make in spec["plugins"]]}
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[watch],
        **kwargs,
    )


def checkpoint_contents(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        trainer.save_checkpoint(path)
        ckpt = torch.load(path, weights_only=True)
        size = path.stat().st_size
    weights = ckpt["state_dict"]
    conv = weights["net.0.weight"]
    optimizer = ckpt["optimizer_states"][0]
    scaler = optimizer.get("scaler") or ckpt.get("MixedPrecision")  # Lightning's GradScaler
    masters = [m.detach() for g in trainer.optimizers[0].param_groups for m in g["params"]]
    exact = torch.equal(conv, masters[0].to(conv.dtype)) and conv.dtype == masters[0].dtype
    return {
        "weights_dtype": str(conv.dtype).removeprefix("torch."),
        "weights_are_the_trained_fp32": bool(exact),
        "loss_scaler": None if scaler is None else {k: scaler[k] for k in sorted(scaler)[:3]},
        "extra_keys": sorted(k for k in ckpt if k[0].isupper()),
        "bytes": size,
    }


def runs_in(trainer: L.Trainer) -> str:
    """What the run computed in: Lightning's precision, or the plugin's dtype and mode."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecisionPlugin):
        return f"{str(plugin.dtype).removeprefix('torch.')}, {plugin.mode}"
    return plugin.precision


def run(setting: str, config: Config, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    x_train, y_train, x_valid, y_valid = data
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=config.batch_size)
    results: dict[str, Any] = {"setting": setting}
    for inf_step in (None, config.inf_step):
        L.seed_everything(config.seed, verbose=False)
        module = DigitsModule(config.lr, inf_step)
        watch = Watch(inf_step)
        trainer = trainer_for(setting, config.epochs, watch)
        trainer.fit(module, loader)
        acc = accuracy(module, x_valid, y_valid)
        if inf_step is None:
            times = watch.epoch_times[1:] or watch.epoch_times  # the first one warms up
            results["accuracy"] = round(acc, 4)
            results["s_per_epoch"] = round(min(times), 3)  # the least disturbed epoch
            results["checkpoint"] = checkpoint_contents(trainer, module)
            results["runs_in"] = runs_in(trainer)
        else:
            finite = all(torch.isfinite(p).all() for p in module.parameters())
            results["inf"] = {
                "step_applied": watch.inf_step_applied,
                "weights_finite": bool(finite),
                "accuracy": round(acc, 4),
            }
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | runs in | accuracy | s/epoch | inf step applied? | weights finite after | "
        "accuracy after inf | checkpoint weights | scaler in checkpoint | checkpoint bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ck, inf = r["checkpoint"], r["inf"]
        weights = ck["weights_dtype"] + (
            " (= trained fp32)" if ck["weights_are_the_trained_fp32"] else ""
        )
        lines.append(
            f"| {r['setting']} | {r['runs_in']} | {r['accuracy']:.4f} | {r['s_per_epoch']:.3f} | "
            f"{'yes' if inf['step_applied'] else 'no (skipped)'} | "
            f"{'yes' if inf['weights_finite'] else 'no (nan)'} | {inf['accuracy']:.4f} | "
            f"{weights} | {'yes' if ck['loss_scaler'] else 'no'} | {ck['bytes']} |"
        )
    return "\n".join(lines)


def parse_args() -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    config = Config(**vars(parser.parse_args()))
    unknown = set(filter(None, config.only.split(","))) - set(SETTINGS)
    if unknown:
        parser.error(f"--only: unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
    return config


def main() -> None:
    config = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the table only
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(config.threads)
    data = digits_tensors(seed=config.seed)
    names = [s for s in SETTINGS if not config.only or s in config.only.split(",")]
    rows = [run(name, config, data) for name in names]
    print(table(rows))
    if config.json:
        Path(config.json).write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
