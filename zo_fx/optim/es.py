"""Evolution strategies (OpenAI-ES, Salimans et al. 2017; ES at scale, Qiu et al. 2025): antithetic pairs,
fitness shaping, and the step scaled by ``1 / (population * eps)``.

The step evaluates N directions at ``+eps`` and ``-eps`` (2N groups in one pass, no unperturbed
group). The 2N losses are shaped together, by centered ranks (default) or z-scores, so only their
order (or standardised spread) matters: the natural partner of a reward objective, whose scale is
arbitrary. With ``s`` the shaped losses and ``P = 2N`` the population,

    theta -= lr * sum_i (s(l_i+) - s(l_i-)) / (P * eps) * u_i

which is OpenAI-ES's antithetic estimate ``1 / (P sigma) sum_j F_j eps_j`` on the shaped fitness
``F = -s`` (lower loss is fitter). The update is a linear combination of the step's directions, so a
trajectory records (seeds, coefficients) and replays bit for bit like FZOO's.
"""

from __future__ import annotations

from dataclasses import dataclass

from zo_fx.checks import check_int
from zo_fx.streams.layout import GAUSSIAN
from zo_fx.streams.table import GroupTable

from .base import SeveralDirections, ZOOptimizer
from .config import ZOConfig

SHAPINGS = ("centered_ranks", "zscore")


def centered_ranks(values: list[float]) -> list[float]:
    """Ranks scaled to ``[-0.5, 0.5]`` (smallest -0.5, largest 0.5); tied values share their mean rank."""
    n = len(values)
    if n == 1:
        return [0.0]
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [r / (n - 1) - 0.5 for r in ranks]


def zscores(values: list[float]) -> list[float] | None:
    """``(v - mean) / std`` (population std); None when every value is the same."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return None if std == 0.0 else [(v - mean) / std for v in values]


@dataclass(frozen=True)
class ESConfig(ZOConfig):
    """ES's settings: those of :class:`ZOConfig` plus ``n_directions`` (antithetic pairs, N >= 1; 2N groups),
    ``shaping`` ("centered_ranks" or "zscore"), and Gaussian directions by default (as OpenAI-ES)."""

    kind: str = GAUSSIAN
    n_directions: int = 4
    shaping: str = "centered_ranks"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("n_directions", check_int(self.n_directions, "n_directions", low=1))
        if self.shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}; got {self.shaping!r}")


class ES(SeveralDirections, ZOOptimizer):
    """Antithetic evolution strategies with fitness shaping (see the module docstring for the formula)."""

    method = "es"
    Config = ESConfig

    def table(self) -> GroupTable:
        seeds = [s for s in self._seeds() for _ in (0, 1)]
        return GroupTable(seeds, [1.0, -1.0] * self.n_directions, self.eps, self.kind)

    def shaped(self, means: list[float]) -> list[float] | None:
        return centered_ranks(means) if self.config.shaping == "centered_ranks" else zscores(means)

    def estimate(self, means):
        shaped = self.shaped(means)
        if shaped is None or all(v == means[0] for v in means):
            return [], [], None, "all perturbed losses are equal: no fitness order, step skipped, weights untouched"
        scale = 1.0 / (2 * self.n_directions * self.eps)
        coefs = [(shaped[2 * i] - shaped[2 * i + 1]) * scale for i in range(self.n_directions)]
        return self._seeds(), coefs, None, None
