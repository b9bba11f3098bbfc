"""mixprec: mixed-precision training for PyTorch.

Forward and backward in fp16 (or bf16), fp32 master weights stepped by any torch optimizer,
and loss scaling against gradient underflow.
"""

from .convert import HALF_DTYPES, NORM_TYPES, cast_floats, model_to_float, model_to_half
from .distributed import (
    DistEnv,
    accumulate,
    cleanup_distributed,
    init_distributed,
    save_on_rank0,
    wrap_ddp,
)
from .master import get_master, master2model, model_g2master_g
from .optimizer import MixedPrecisionOptimizer
from .planning import ModulePlan, Plan, plan
from .policy import PrecisionPolicy
from .scaler import LossScaler, unscale_and_check_
from .stepper import Stepper

__version__ = "0.1.0"

__all__ = [
    "DistEnv",
    "HALF_DTYPES",
    "NORM_TYPES",
    "LossScaler",
    "MixedPrecisionOptimizer",
    "ModulePlan",
    "Plan",
    "PrecisionPolicy",
    "Stepper",
    "accumulate",
    "cast_floats",
    "cleanup_distributed",
    "get_master",
    "init_distributed",
    "master2model",
    "model_g2master_g",
    "model_to_float",
    "model_to_half",
    "plan",
    "save_on_rank0",
    "unscale_and_check_",
    "wrap_ddp",
]
