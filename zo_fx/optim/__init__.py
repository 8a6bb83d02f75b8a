"""Update rules over a compiled module: one file per method, the registry, trajectories, checkpoints."""

from .adamezo import AdaMeZO, AdaMeZOConfig
from .base import StepInfo, ZOOptimizer, decays, direction_seed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ZOConfig
from .distributed import STRATEGIES, Distributed, DistributedStepError, local_shards
from .es import ES, ESConfig
from .fzoo import FZOO, FZOOConfig
from .hizoo import HiZOO, HiZOOConfig
from .mezo import MeZO, MeZOConfig
from .momentum import ZOSGDMomentum, ZOSGDMomentumConfig
from .registry import METHODS, Method, build_optimizer, get_method
from .reward import RewardObjective
from .trajectory import ParamSpec, Trajectory, TrajectoryError, replay
from .zoadam import ZOAdam, ZOAdamConfig

__all__ = [
    "METHODS", "STRATEGIES", "Distributed", "DistributedStepError", "local_shards",
    "ES", "ESConfig", "HiZOO", "HiZOOConfig", "ZOAdam", "ZOAdamConfig", "ZOSGDMomentum", "ZOSGDMomentumConfig",
    "FZOO", "AdaMeZO", "AdaMeZOConfig", "FZOOConfig", "MeZO", "MeZOConfig", "Method", "ParamSpec",
    "RewardObjective", "StepInfo", "Trajectory", "TrajectoryError", "ZOConfig", "ZOOptimizer", "build_optimizer",
    "decays",
    "direction_seed",
    "get_method", "latest_checkpoint", "load_checkpoint", "replay", "save_checkpoint",
]
