"""AdaMeZO: MeZO estimates with truncated Adam moments rebuilt from the last K directions."""

from __future__ import annotations

from dataclasses import dataclass

from zo_fx.checks import check_int, check_real

from .mezo import MeZO, MeZOConfig
from .trajectory import Trajectory


@dataclass(frozen=True)
class AdaMeZOConfig(MeZOConfig):
    """AdaMeZO's settings: MeZO's plus the moment window.

    Attributes:
        horizon: K, the number of past directions the moments are rebuilt from (>= 1).
        betas: (b1, b2), each in [0, 1): the decay of the first and second moment over the window.
        scale: the constant the reference code multiplies the step by (100), so its lrs carry over.
        adam_eps: added to sqrt(v), > 0.
    """

    horizon: int = 10
    betas: tuple = (0.7, 0.9)
    scale: float = 100.0
    adam_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("horizon", check_int(self.horizon, "horizon", low=1))
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be (b1, b2); got {self.betas!r}")
        self._set("betas", tuple(check_real(b, f"betas[{i}]", low=0.0, high=1.0, high_open=True)
                                 for i, b in enumerate(betas)))
        self._set("scale", check_real(self.scale, "scale", low=0.0, low_open=True))
        self._set("adam_eps", check_real(self.adam_eps, "adam_eps", low=0.0, low_open=True))


class AdaMeZO(MeZO):
    """AdaMeZO over a compiled module.

    The moments are never stored: each update regenerates the last K directions chunk
    by chunk from their seeds (random access into the Philox streams) and forms
    ``m = sum b1^j p_j z_j``, ``v = sum b2^j p_j^2 z_j^2``, ``step = scale * m / (sqrt(v) + adam_eps)``.
    The first ``horizon`` steps are plain MeZO steps (the reference's warm-up).
    """

    method = "adamezo"
    Config = AdaMeZOConfig

    @property
    def horizon(self) -> int:
        return self.config.horizon

    def _new_trajectory(self) -> Trajectory:
        trajectory = super()._new_trajectory()
        c = self.config
        trajectory.horizon, trajectory.betas, trajectory.ada_scale, trajectory.adam_eps = (
            c.horizon, c.betas, c.scale, c.adam_eps)
        return trajectory

    def _record(self, seeds, coefs, lr) -> dict:
        rec = super()._record(seeds, coefs, lr)
        accepted = len(self.trajectory.records) + 1
        rec["mode"] = "linear" if accepted <= self.horizon else "adamezo"
        return rec
