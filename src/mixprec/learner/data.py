"""`DataBunch`: a training and a validation loader that move batches to a device and apply
batch transforms."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from mixprec.learner.checks import check_batch, holds_tensor

__all__ = ["DataBunch", "DeviceDataLoader", "batch_size", "loader_length", "to_device"]

BatchTransform = Callable[[Any], Any]


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple/list/dict to `device`; leave the rest."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, PackedSequence):  # its own .to keeps batch_sizes on the CPU
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_size(obj: Any) -> int:
    """The number of samples in a (nested) tuple/list/dict batch part: the first dimension
    of its first tensor (1 for a 0-d tensor), else its length."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else 1
    if isinstance(obj, (Mapping, list, tuple)):
        for part in obj.values() if isinstance(obj, Mapping) else obj:
            if holds_tensor(part):
                return batch_size(part)
    return len(obj)


def loader_length(dl: Any) -> int | None:
    """`len(dl)`, or None for a loader without one (over an IterableDataset, say)."""
    try:
        return len(dl)
    except TypeError:
        return None


class DeviceDataLoader:
    """Iterates `dl`, moving each batch to `device`, checking that it is an (input, target)
    pair of tensors, and then applying `tfms` in order."""

    def __init__(self, dl: Iterable, device: torch.device, tfms: list[BatchTransform]) -> None:
        self.dl = dl
        self.device = device
        self.tfms = tfms  # shared with the DataBunch, so add_tfm reaches every loader

    def __len__(self) -> int:
        return len(self.dl)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.dl):
            batch = to_device(batch, self.device)
            check_batch(batch, i)  # a clear error here, not a puzzling one in the model
            for tfm in self.tfms:
                batch = tfm(batch)
            yield batch

    def __repr__(self) -> str:
        return f"DeviceDataLoader({self.dl!r}, device={self.device}, tfms={len(self.tfms)})"


class DataBunch:
    """A training loader and an optional validation loader, on one device.

    Batches are `(input, target)` pairs; a transform added with `add_tfm(fn)` receives each
    batch (already on `device`) and returns the batch to use, for both loaders.
    `device` defaults to CUDA when available, else the CPU.
    """

    def __init__(
        self,
        train_dl: Iterable,
        valid_dl: Iterable | None = None,
        device: torch.device | str | None = None,
        tfms: Iterable[BatchTransform] = (),
    ) -> None:
        for name, dl in (("train_dl", train_dl), ("valid_dl", valid_dl)):
            if (dl is not None or name == "train_dl") and not isinstance(dl, Iterable):
                raise TypeError(
                    f"{name} must be an iterable of (input, target) batches, e.g. a "
                    f"torch DataLoader; got {type(dl).__name__}."
                )
        if callable(tfms) or not isinstance(tfms, Iterable):
            raise TypeError(
                "tfms must be a list of batch transforms; got "
                f"{getattr(tfms, '__name__', type(tfms).__name__)!s}. Pass tfms=[fn]."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tfms: list[BatchTransform] = []
        for tfm in tfms:
            self.add_tfm(tfm)
        self.train_dl = DeviceDataLoader(train_dl, self.device, self.tfms)
        self.valid_dl = (
            None if valid_dl is None else DeviceDataLoader(valid_dl, self.device, self.tfms)
        )

    def add_tfm(self, tfm: BatchTransform) -> None:
        """Apply `tfm` to every batch after the ones already added."""
        if not callable(tfm):
            raise TypeError(
                f"a batch transform must be callable, batch -> batch; got {type(tfm).__name__}."
            )
        self.tfms.append(tfm)

    def remove_tfm(self, tfm: BatchTransform) -> None:
        """Stop applying `tfm` (a transform that is not there is ignored)."""
        if tfm in self.tfms:
            self.tfms.remove(tfm)

    def __repr__(self) -> str:
        return (
            f"DataBunch(train={loader_length(self.train_dl)} batches, "
            f"valid={None if self.valid_dl is None else loader_length(self.valid_dl)} batches, "
            f"device={self.device}, tfms={len(self.tfms)})"
        )
