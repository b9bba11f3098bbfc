"""Callbacks for `Learner`, fastai v1 style: `from mixprec.callbacks.fp16 import MixedPrecision`."""

from .csv_logger import CSVLogger
from .fp16 import MixedPrecision

__all__ = ["CSVLogger", "MixedPrecision"]
