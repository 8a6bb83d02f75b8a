"""zo_fx: zeroth-order fine-tuning compiled into one batched forward pass."""

from . import rewards
from .compile import ZOModule, zo_compile
from .losses import CandidateClassificationLoss, MaskedCandidateLoss, SpanQALoss, causal_lm_loss
from .optim import (
    ES,
    FZOO,
    METHODS,
    AdaMeZO,
    AdaMeZOConfig,
    ESConfig,
    FZOOConfig,
    HiZOO,
    HiZOOConfig,
    MeZO,
    MeZOConfig,
    RewardObjective,
    StepInfo,
    Trajectory,
    TrajectoryError,
    ZOAdam,
    ZOAdamConfig,
    ZOConfig,
    ZOOptimizer,
    ZOSGDMomentum,
    ZOSGDMomentumConfig,
    build_optimizer,
    replay,
)
from .passes.capture import ExportFailedError
from .passes.rewrite import UncoveredParameterUseError, UnsupportedGraphError
from .streams.table import GroupTable


def __getattr__(name):
    # transformers' Trainer is a heavy import: load ZOTrainer only when asked for
    if name == "ZOTrainer":
        from .integrations.hf_trainer import ZOTrainer

        return ZOTrainer
    raise AttributeError(f"module 'zo_fx' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "zo_compile", "ZOModule", "GroupTable", "CandidateClassificationLoss", "MaskedCandidateLoss", "causal_lm_loss",
    "SpanQALoss", "HiZOO", "HiZOOConfig",
    "MeZO", "FZOO", "AdaMeZO", "ES", "ESConfig", "ZOAdam", "ZOAdamConfig", "ZOSGDMomentum",
    "ZOSGDMomentumConfig", "ZOOptimizer", "StepInfo", "Trajectory", "replay", "ZOTrainer",
    "ZOConfig", "MeZOConfig", "FZOOConfig", "AdaMeZOConfig", "METHODS", "build_optimizer",
    "ExportFailedError", "UncoveredParameterUseError", "UnsupportedGraphError", "TrajectoryError",
    "RewardObjective", "rewards",
]
