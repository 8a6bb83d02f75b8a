"""One registry of methods: name -> (config class, optimizer class).

The Trainer integration, the fine-tuning job, the benchmarks, the examples and the tests
all build optimizers through it, so a method added here is available everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

from .adamezo import AdaMeZO, AdaMeZOConfig
from .base import ZOOptimizer
from .config import ZOConfig
from .es import ES, ESConfig
from .fzoo import FZOO, FZOOConfig
from .hizoo import HiZOO, HiZOOConfig
from .mezo import MeZO, MeZOConfig
from .momentum import ZOSGDMomentum, ZOSGDMomentumConfig
from .zoadam import ZOAdam, ZOAdamConfig


class Method(NamedTuple):
    config: type[ZOConfig]
    optimizer: type[ZOOptimizer]


METHODS: dict[str, Method] = {
    "fzoo": Method(FZOOConfig, FZOO),
    "mezo": Method(MeZOConfig, MeZO),
    "adamezo": Method(AdaMeZOConfig, AdaMeZO),
    "es": Method(ESConfig, ES),
    "zosgd_momentum": Method(ZOSGDMomentumConfig, ZOSGDMomentum),
    "zoadam": Method(ZOAdamConfig, ZOAdam),
    "hizoo": Method(HiZOOConfig, HiZOO),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown zeroth-order method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_optimizer(name: str, zm, *, lr_schedule=None, **settings) -> ZOOptimizer:
    """``METHODS[name].optimizer(zm, **settings)``: settings as the method's config takes them."""
    method = get_method(name)
    return method.optimizer(zm, lr_schedule=lr_schedule, **settings)

