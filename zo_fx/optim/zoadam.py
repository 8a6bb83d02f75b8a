"""ZO-Adam: MeZO's estimate into Adam's moments, as the FZOO and AdaMeZO papers' baseline runs it.

``g = p z`` (one two-sided direction), ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``theta -= lr (m_hat / (sqrt(v_hat) + eps) + wd theta)`` with bias-corrected moments. Unlike AdaMeZO,
which rebuilds truncated moments from the last K seeds, the moments are stored: two float32 tensors
per trainable parameter (float64 for float64 ones), twice the weights' memory in float32, saved in a
checkpoint's ``state.safetensors``. A trajectory replays from its first record.
"""

from __future__ import annotations

from dataclasses import dataclass

from zo_fx.checks import check_real

from .mezo import MeZO, MeZOConfig
from .trajectory import Trajectory


@dataclass(frozen=True)
class ZOAdamConfig(MeZOConfig):
    """MeZO's settings plus Adam's ``betas`` (each in [0, 1), b1 < sqrt(b2)) and ``adam_eps`` (> 0)."""

    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be (b1, b2); got {self.betas!r}")
        b1, b2 = (check_real(b, f"betas[{i}]", low=0.0, high=1.0, high_open=True) for i, b in enumerate(betas))
        if b1 * b1 >= b2:
            raise ValueError(f"betas {betas}: b1 must be below sqrt(b2), or Adam's step has no bound")
        self._set("betas", (b1, b2))
        self._set("adam_eps", check_real(self.adam_eps, "adam_eps", low=0.0, low_open=True))


class ZOAdam(MeZO):
    """MeZO's two-sided estimate, applied through stored Adam moments."""

    method = "zoadam"
    Config = ZOAdamConfig
    stateful = True

    def _new_trajectory(self) -> Trajectory:
        trajectory = super()._new_trajectory()
        trajectory.betas, trajectory.adam_eps = self.config.betas, self.config.adam_eps
        return trajectory

    def _record(self, seeds, coefs, lr) -> dict:
        return {**super()._record(seeds, coefs, lr), "mode": "zoadam"}
