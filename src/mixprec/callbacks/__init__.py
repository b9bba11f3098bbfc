"""Callbacks for `Learner`, fastai v1 style: `from mixprec.callbacks.fp16 import MixedPrecision`."""

from .fp16 import MixedPrecision

__all__ = ["MixedPrecision"]
