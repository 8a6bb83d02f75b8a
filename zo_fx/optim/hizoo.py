"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
Optimizer", ICLR 2025): MeZO's two-sided estimate with a diagonal curvature estimate that shapes both the
perturbation and the step.

Per step, with ``z`` a Gaussian direction and ``H`` the stored diagonal (ones at the start), three
perturbed copies run in one batched pass: ``theta``, ``theta + eps z / sqrt(H)``, ``theta - eps z / sqrt(H)``
(losses ``l0``, ``l+``, ``l-``; the scaled direction is applied inside the forward by
:mod:`zo_fx.kernels.scaling`). Then

* ``p = (l+ - l-) / (2 eps)`` (the projected gradient),
* ``c = |l+ + l- - 2 l0| / (2 eps^2)`` (the curvature along the scaled direction),
* ``H = (1 - alpha) H + alpha c H z^2`` (the paper's EMA of ``|diag(Sigma^-1/2 u u^T Sigma^-1/2)|`` times
  the second difference, with ``Sigma = H^-1``),
* ``theta -= lr (p z / sqrt(H) + wd theta)`` with the updated ``H``.

Directions are Gaussian: with Rademacher signs ``z^2 = 1`` and ``H`` would only be rescaled as a whole,
and a low-rank ``A B^T`` scaled element by element is no longer low rank, so both are refused.

Memory: ``H`` is one float32 tensor per trainable parameter (float64 for float64 ones), stored and
checkpointed (``state.safetensors``): the weights' size once more in float32. During the forward each
perturbed use of a parameter forms ``1 / sqrt(H)`` of it transiently; a scaled weight takes the
blocked GEMM on CPU (the scaled direction made tile by tile, one read of the weight for the three
groups) or the per-group torch path (no Triton GEMM). What a bit-exact replay needs: every record
(seed, ``p``, ``c``, lr) from the first, ``alpha`` and the weight decay; ``H`` is rebuilt as the run
built it, so replay starts at record 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zo_fx.checks import check_real
from zo_fx.kernels.scaling import scaled_directions
from zo_fx.streams.layout import GAUSSIAN
from zo_fx.streams.table import GroupTable

from .mezo import MeZO, MeZOConfig
from .trajectory import Trajectory


@dataclass(frozen=True)
class HiZOOConfig(MeZOConfig):
    """MeZO's settings (directions Gaussian) plus ``hessian_smooth`` (alpha in (0, 1)): the EMA weight of
    each step's curvature estimate. The reference code's schedules keep it tiny (1e-6 .. 1e-10); the
    default 1e-6 follows them."""

    kind: str = GAUSSIAN
    hessian_smooth: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != GAUSSIAN:
            raise ValueError(
                f"kind: HiZOO estimates a diagonal curvature from z^2 and needs Gaussian directions; got {self.kind!r} "
                "(Rademacher z^2 is 1 everywhere, and a low-rank direction scaled per element is not low rank)"
            )
        self._set("hessian_smooth", check_real(self.hessian_smooth, "hessian_smooth", low=0.0, high=1.0,
                                               low_open=True, high_open=True))


class HiZOO(MeZO):
    """Three groups (theta, theta +- eps z / sqrt(H)), the diagonal curvature EMA, the scaled step."""

    method = "hizoo"
    Config = HiZOOConfig
    stateful = True

    def table(self) -> GroupTable:
        s = self.step_seeds(1)[0]
        return GroupTable([s, s, s], [0.0, 1.0, -1.0], self.eps, self.kind)

    def estimate(self, means):
        s = self.step_seeds(1)[0]
        l0, plus, minus = means
        self._curvature = abs(plus + minus - 2.0 * l0) / (2.0 * self.eps * self.eps)
        if not math.isfinite(self._curvature):
            return [], [], None, "the curvature estimate is not finite: step skipped, weights untouched"
        return [s], [(plus - minus) / (2.0 * self.eps)], None, None

    def _record(self, seeds, coefs, lr) -> dict:
        return {**super()._record(seeds, coefs, lr), "mode": "hizoo", "curvature": self._curvature}

    def _new_trajectory(self) -> Trajectory:
        trajectory = super()._new_trajectory()
        trajectory.betas = (self.config.hessian_smooth, 0.0)
        return trajectory

    def direction_scaling(self):
        """The forward's directions are ``z / sqrt(H)`` once ``H`` exists (before the first update it is ones)."""
        curvature = {self.zm.pids[name]: buffers["h"] for name, buffers in (self.state or {}).items() if "h" in buffers}
        return scaled_directions(curvature)
