"""mixprec: mixed-precision training for PyTorch.

Forward and backward in fp16 (or bf16), fp32 master weights stepped by any torch optimizer,
and loss scaling against gradient underflow.
"""

from .autocast import AutocastOptimizer
from .callback import EVENTS, Callback, CallbackHandler
from .callbacks.csv_logger import CSVLogger
from .callbacks.fp16 import MixedPrecision
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import HALF_DTYPES, NORM_TYPES, cast_floats, model_to_float, model_to_half
from .data import DataBunch, DeviceDataLoader
from .diagnose import GradientRange, diagnose
from .distributed import (
    DistEnv,
    accumulate,
    cleanup_distributed,
    init_distributed,
    save_on_rank0,
    wrap_ddp,
)
from .forensics import OverflowReport
from .learner import Learner
from .master import get_master, master2model, model_g2master_g
from .metrics import accuracy
from .modes import MODES, Mode
from .optimizer import MixedPrecisionOptimizer
from .parallel import Ranks
from .planning import ModulePlan, Plan, plan
from .policy import PrecisionPolicy
from .recorder import Recorder, plot_runs
from .scaler import LossScaler, unscale_and_check_
from .stepper import Stepper
from .telemetry import NO_TELEMETRY, Telemetry, TelemetryRow

__version__ = "0.1.0"

__all__ = [
    "AutocastOptimizer",
    "CSVLogger",
    "MODES",
    "Mode",
    "NO_TELEMETRY",
    "Telemetry",
    "TelemetryRow",
    "Callback",
    "CallbackHandler",
    "DataBunch",
    "DeviceDataLoader",
    "DistEnv",
    "EVENTS",
    "GradientRange",
    "HALF_DTYPES",
    "Learner",
    "LossScaler",
    "MixedPrecision",
    "MixedPrecisionOptimizer",
    "ModulePlan",
    "NORM_TYPES",
    "OverflowReport",
    "Plan",
    "PrecisionPolicy",
    "Ranks",
    "Recorder",
    "Stepper",
    "accumulate",
    "accuracy",
    "cast_floats",
    "cleanup_distributed",
    "diagnose",
    "get_master",
    "init_distributed",
    "load_checkpoint",
    "master2model",
    "model_g2master_g",
    "model_to_float",
    "model_to_half",
    "plan",
    "plot_runs",
    "save_checkpoint",
    "save_on_rank0",
    "unscale_and_check_",
    "wrap_ddp",
]
