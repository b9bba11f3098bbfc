"""mixprec: mixed-precision training for PyTorch.

Forward and backward in fp16 (or bf16), fp32 master weights stepped by any torch optimizer,
and loss scaling against gradient underflow. The names here are the ones users call; each
lives in the layer that defines it (`mixprec.core`, `.parallel`, `.engine`, `.learner`,
`.inspect`, `.cli`), where the rest of the API is.
"""

from mixprec.core.checkpoint import load_checkpoint, save_checkpoint
from mixprec.core.convert import model_to_float, model_to_half
from mixprec.core.master import get_master, master2model, model_g2master_g
from mixprec.core.policy import PrecisionPolicy
from mixprec.core.scaler import LossScaler
from mixprec.engine.autocast import AutocastOptimizer
from mixprec.engine.forensics import OverflowReport
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.engine.stepper import Stepper
from mixprec.engine.telemetry import Telemetry
from mixprec.engine.wrapper import StepState
from mixprec.inspect.diagnose import diagnose
from mixprec.inspect.planning import plan
from mixprec.learner.callback import Callback
from mixprec.learner.csv_logger import CSVLogger
from mixprec.learner.data import DataBunch
from mixprec.learner.learner import Learner
from mixprec.learner.metrics import accuracy
from mixprec.learner.mixed_precision import MixedPrecision
from mixprec.learner.model_output import model_loss
from mixprec.learner.recorder import Recorder
from mixprec.learner.tracking import EarlyStoppingCallback, SaveModelCallback
from mixprec.parallel.distributed import (
    accumulate,
    cleanup_distributed,
    init_distributed,
    save_on_rank0,
    wrap_ddp,
)

__version__ = "0.1.0"

__all__ = [
    # fastai v1's documented API (mixprec.callbacks.fp16)
    "MixedPrecision",
    "get_master",
    "master2model",
    "model_g2master_g",
    # the engine, for plain PyTorch loops
    "AutocastOptimizer",
    "LossScaler",
    "MixedPrecisionOptimizer",
    "OverflowReport",
    "StepState",
    "Stepper",
    "Telemetry",
    "model_to_float",
    "model_to_half",
    # precision policy and inspection
    "PrecisionPolicy",
    "diagnose",
    "plan",
    # the Learner
    "CSVLogger",
    "Callback",
    "DataBunch",
    "EarlyStoppingCallback",
    "Learner",
    "Recorder",
    "SaveModelCallback",
    "accuracy",
    "model_loss",
    # checkpoints and torch.distributed
    "accumulate",
    "cleanup_distributed",
    "init_distributed",
    "load_checkpoint",
    "save_checkpoint",
    "save_on_rank0",
    "wrap_ddp",
]
