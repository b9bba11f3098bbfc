"""mixprec: mixed-precision training for PyTorch.

Forward and backward in fp16 (or bf16), fp32 master weights stepped by any torch optimizer,
and loss scaling against gradient underflow.
"""

from .convert import HALF_DTYPES, NORM_TYPES, cast_floats, model_to_float, model_to_half
from .diagnose import GradientRange, diagnose
from .master import get_master, master2model, model_g2master_g
from .optimizer import MixedPrecisionOptimizer
from .scaler import LossScaler, unscale_and_check_

__version__ = "0.1.0"

__all__ = [
    "HALF_DTYPES",
    "NORM_TYPES",
    "GradientRange",
    "LossScaler",
    "MixedPrecisionOptimizer",
    "cast_floats",
    "diagnose",
    "get_master",
    "master2model",
    "model_g2master_g",
    "model_to_float",
    "model_to_half",
    "unscale_and_check_",
]
