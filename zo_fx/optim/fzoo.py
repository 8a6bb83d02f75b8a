"""FZOO (Dang et al.): N one-sided Rademacher directions, the step normalised by the loss spread."""

from __future__ import annotations

import math
from dataclasses import dataclass

from zo_fx.checks import check_int
from zo_fx.streams.table import GroupTable

from .base import SeveralDirections, ZOOptimizer
from .config import ZOConfig


@dataclass(frozen=True)
class FZOOConfig(ZOConfig):
    """FZOO's settings: those of :class:`ZOConfig` plus ``n_directions`` (N >= 2, for the spread)."""

    n_directions: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("n_directions", check_int(self.n_directions, "n_directions", low=2))


class FZOO(SeveralDirections, ZOOptimizer):
    """FZOO as its reference code runs it.

    ``sigma = std(l_1..l_N)`` (population), ``coef_i = (l_i - l_0) / (N * sigma)``,
    ``theta -= lr * sum_i coef_i * u_i``. A zero spread (all losses equal) skips the step.
    Group 0 is the unperturbed model (coefficient 0), groups 1..N one direction each.
    """

    method = "fzoo"
    Config = FZOOConfig

    def table(self) -> GroupTable:
        return GroupTable([0] + self._seeds(), [0.0] + [1.0] * self.n_directions, self.eps, self.kind)

    def estimate(self, means):
        l0, rest = means[0], means[1:]
        mean = sum(rest) / len(rest)
        sigma = math.sqrt(sum((v - mean) ** 2 for v in rest) / len(rest))
        if sigma == 0.0:
            return [], [], sigma, "all perturbed losses are equal (sigma = 0): step skipped, weights untouched"
        n = self.n_directions
        return self._seeds(), [(v - l0) / (n * sigma) for v in rest], sigma, None
