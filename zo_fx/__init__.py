"""zo_fx: zeroth-order fine-tuning compiled into one batched forward pass."""

from .passes.capture import ExportFailedError
from .passes.rewrite import UncoveredParameterUseError, UnsupportedGraphError
from .runtime.losses import CandidateClassificationLoss, causal_lm_loss
from .runtime.module import GroupTable, ZOModule, zo_compile
from .runtime.optimizers import FZOO, AdaMeZO, MeZO, StepInfo, ZOOptimizer
from .runtime.trajectory import Trajectory, replay


def __getattr__(name):
    # transformers' Trainer is a heavy import: load ZOTrainer only when asked for
    if name == "ZOTrainer":
        from .runtime.trainer import ZOTrainer

        return ZOTrainer
    raise AttributeError(f"module 'zo_fx' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "zo_compile", "ZOModule", "GroupTable", "CandidateClassificationLoss", "causal_lm_loss",
    "MeZO", "FZOO", "AdaMeZO", "ZOOptimizer", "StepInfo", "Trajectory", "replay", "ZOTrainer",
    "ExportFailedError", "UncoveredParameterUseError", "UnsupportedGraphError",
]
