"""MeZO (Malladi et al., 2023): one direction, two-sided, ``p = (l+ - l-) / (2 eps)``."""

from __future__ import annotations

from dataclasses import dataclass

from zo_fx.streams.layout import GAUSSIAN
from zo_fx.streams.table import GroupTable

from .base import ZOOptimizer
from .config import ZOConfig


@dataclass(frozen=True)
class MeZOConfig(ZOConfig):
    """MeZO's settings: those of :class:`ZOConfig`, Gaussian directions by default (the paper's)."""

    kind: str = GAUSSIAN


class MeZO(ZOOptimizer):
    """MeZO: ``theta -= lr * (p * z + wd * theta)`` with ``p`` from the losses at ``theta +- eps z``.

    Both groups share one seed, so one pass evaluates +eps and -eps of the same direction.
    """

    method = "mezo"
    Config = MeZOConfig

    def table(self) -> GroupTable:
        s = self.step_seeds(1)[0]
        return GroupTable([s, s], [1.0, -1.0], self.eps, self.kind)

    def estimate(self, means):
        s = self.step_seeds(1)[0]
        return [s], [(means[0] - means[1]) / (2 * self.eps)], None, None
