"""Directions scaled element by element during one forward: HiZOO's ``theta +- eps * u / sqrt(H)``.

A diagonal preconditioner makes every element's step its own size, so the perturbed
copies are ``theta + s_g * d * u(seed_g)`` with ``d = 1 / sqrt(H)`` a stored tensor per
parameter. The rewritten graph does not change: the torch paths that form a perturbation
(a per-group weight, the blocked GEMM's tiles, a looked-up embedding row, the output head's
rows, a small parameter's copies) multiply the generated values by ``d`` when
:func:`scaled_directions` is active for that parameter, and the paths that generate inside a
fused kernel (the Triton kernels, the native tile kernel, low-rank factors) step aside for
one of those, which have the scaled values exactly.

Every parameter given a scale must be perturbed through one of those paths during the
forward: :meth:`DirectionScaling.check_all_applied` fails loudly when one was not, so a
path that does not know about scaling can never give an unscaled direction in silence.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch


class DirectionScaling:
    """``pid -> H`` (the stored diagonal curvature): the direction of that parameter is ``u / sqrt(H)``."""

    def __init__(self, curvature: dict[int, torch.Tensor]):
        self.curvature = curvature
        self.applied: set[int] = set()

    def factor(self, pid: int, dtype) -> torch.Tensor:
        """``1 / sqrt(H)`` of parameter ``pid`` in ``dtype`` (the one formula every path and the update use)."""
        self.applied.add(pid)
        return direction_factor(self.curvature[pid], dtype)

    def check_all_applied(self) -> None:
        missing = sorted(set(self.curvature) - self.applied)
        if missing:
            raise RuntimeError(
                f"the per-element direction scale of parameter stream(s) {missing[:5]} was not applied during the "
                "forward: a path formed their perturbation without it. This is a bug in zo_fx; the step is refused "
                "rather than computed with unscaled directions"
            )


def direction_factor(curvature: torch.Tensor, dtype) -> torch.Tensor:
    """``1 / sqrt(H)`` computed in ``dtype``: the scale of the direction, as the forward and the update read it."""
    return torch.sqrt(curvature.to(dtype)).reciprocal_()


_active: ContextVar[DirectionScaling | None] = ContextVar("zo_fx_direction_scaling", default=None)


@contextmanager
def scaled_directions(curvature: dict[int, torch.Tensor]):
    """Inside: parameter ``pid``'s direction is ``u / sqrt(curvature[pid])`` in every perturbed forward.

    Yields the :class:`DirectionScaling`; on a normal exit every scaled parameter must have been applied.
    """
    scaling = DirectionScaling(curvature)
    token = _active.set(scaling)
    try:
        yield scaling
    finally:
        _active.reset(token)
    scaling.check_all_applied()


def applies(*pids) -> bool:
    """Whether any of these parameter streams (None: a frozen tensor) has a scaled direction now."""
    scaling = _active.get()
    return scaling is not None and any(pid is not None and pid in scaling.curvature for pid in pids)


def factor_for(pid, dtype) -> torch.Tensor | None:
    """``1 / sqrt(H)`` of ``pid`` when its direction is scaled now (recorded as applied), else None."""
    scaling = _active.get()
    if scaling is None or pid is None or pid not in scaling.curvature:
        return None
    return scaling.factor(pid, dtype)


__all__ = ["DirectionScaling", "applies", "direction_factor", "factor_for", "scaled_directions"]
