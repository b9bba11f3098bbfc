"""fastai v1's `callbacks.fp16` module, kept to the letter:
`from mixprec.callbacks.fp16 import get_master, model_g2master_g, master2model, MixedPrecision`.

The primitives live in `mixprec.core.master`, the callback in `mixprec.learner.mixed_precision`.
"""

from mixprec.core.master import get_master, master2model, model_g2master_g
from mixprec.learner.mixed_precision import MixedPrecision

__all__ = ["MixedPrecision", "get_master", "master2model", "model_g2master_g"]
