"""Callbacks for `Learner`, at the paths fastai v1 users know (`mixprec.callbacks.fp16`)."""

from mixprec.learner.csv_logger import CSVLogger
from mixprec.learner.mixed_precision import MixedPrecision

__all__ = ["CSVLogger", "MixedPrecision"]
