"""The group table: which perturbed copies of the model one forward pass evaluates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zo_fx.checks import check_real

from .layout import MAX_SEED, RADEMACHER, check_direction_kind, check_seed, is_lowrank, rank_of


@dataclass(frozen=True)
class GroupTable:
    """G rows of (seed, coefficient): group g sees ``theta + eps * coefs[g] * u(seeds[g])``.

    A coefficient of 0 is the unperturbed model. MeZO uses ``GroupTable([s, s], [1, -1], eps)``,
    FZOO ``GroupTable([0, s1..sN], [0, 1..1], eps)``. Seeds must be integers in ``[0, 2**64)``,
    coefficients and eps finite (eps >= 0): anything else is refused, never rounded.
    ``kind``: ``"rademacher"``, ``"gaussian"``, or ``"lowrank"`` with ``rank=r`` (stored as
    ``"lowrank:r"``): each matrix moves along ``A B^T / sqrt(r)``, every other parameter along
    Rademacher signs.
    """

    seeds: tuple
    coefs: tuple
    eps: float
    kind: str = RADEMACHER

    def __init__(self, seeds: Sequence[int], coefs: Sequence[float], eps: float, kind: str = RADEMACHER,
                 rank: int | None = None):
        seeds = tuple(check_seed(s) for s in seeds)
        coefs = tuple(check_real(c, f"coefficient {i}", allow_tensor=True) for i, c in enumerate(coefs))
        if len(seeds) != len(coefs) or not seeds:
            raise ValueError(
                f"a group table needs as many seeds as coefficients (>= 1); got {len(seeds)} and {len(coefs)}"
            )
        eps = check_real(eps, "eps", low=0.0, allow_tensor=True)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "coefs", coefs)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "kind", check_direction_kind(kind, rank))

    @property
    def rank(self) -> int | None:
        """The rank of low-rank directions, None for element-wise ones."""
        return rank_of(self.kind) if is_lowrank(self.kind) else None

    @property
    def groups(self) -> int:
        return len(self.seeds)

    @property
    def scales(self) -> tuple:
        return tuple(self.eps * c for c in self.coefs)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seeds, scales) as the graph takes them: int64 (two's complement of the uint64 seed), float64."""
        signed = [s - (MAX_SEED + 1) if s >= 2**63 else s for s in self.seeds]
        return torch.tensor(signed, dtype=torch.int64), torch.tensor(self.scales, dtype=torch.float64)


def seeds_from_tensor(seeds: torch.Tensor) -> list[int]:
    """The uint64 seeds of a table's int64 seed tensor (the inverse of :meth:`GroupTable.tensors`)."""
    return [int(s) & MAX_SEED for s in seeds.tolist()]
