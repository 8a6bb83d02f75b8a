"""ZO-SGD with momentum (ZO-Bench's ZO-SGD-MMT): MeZO's estimate into a momentum buffer.

``m = beta m + p z``, ``theta -= lr (m + wd theta)``, with ``p = (l+ - l-) / (2 eps)`` from one two-sided
direction as MeZO. The buffer is one float32 tensor per trainable parameter (float64 for float64
ones), stored: memory is that of the weights once more (in float32), and a checkpoint saves it
(``state.safetensors``). A trajectory replays from its first record (see :mod:`zo_fx.optim.stateful`).
"""

from __future__ import annotations

from dataclasses import dataclass

from zo_fx.checks import check_real

from .mezo import MeZO, MeZOConfig
from .trajectory import Trajectory


@dataclass(frozen=True)
class ZOSGDMomentumConfig(MeZOConfig):
    """MeZO's settings plus ``momentum`` (beta in [0, 1))."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("momentum", check_real(self.momentum, "momentum", low=0.0, high=1.0, high_open=True))


class ZOSGDMomentum(MeZO):
    """MeZO's two-sided estimate, applied through a stored momentum buffer."""

    method = "zosgd_momentum"
    Config = ZOSGDMomentumConfig
    stateful = True

    def _new_trajectory(self) -> Trajectory:
        trajectory = super()._new_trajectory()
        trajectory.betas = (self.config.momentum, 0.0)
        return trajectory

    def _record(self, seeds, coefs, lr) -> dict:
        return {**super()._record(seeds, coefs, lr), "mode": "momentum"}
