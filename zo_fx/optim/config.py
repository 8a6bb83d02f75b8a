"""Validated optimizer settings: every number checked where it enters, or a clear error.

A config is a frozen dataclass: the one place an optimizer's settings live (its
trajectory copies them for replay), serialisable with :meth:`ZOConfig.to_dict` and
compared field by field when a run resumes (:meth:`ZOConfig.differences`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zo_fx.checks import check_int, check_real
from zo_fx.streams.layout import RADEMACHER, check_direction_kind, is_lowrank, lowrank_kind, rank_of

#: direction seeds derive from the optimizer seed; it is hashed, so any non-negative 63-bit int works
MAX_RUN_SEED = 2**63 - 1


@dataclass(frozen=True)
class ZOConfig:
    """Settings every zeroth-order method shares.

    Attributes:
        lr: learning rate, finite and >= 0 (0 evaluates without moving the weights).
        eps: perturbation scale, finite and > 0.
        weight_decay: decoupled weight decay, finite and >= 0 (never on biases and norms).
        kind: direction distribution, "rademacher", "gaussian", or "lowrank" (rank-``rank`` products
            ``A B^T / sqrt(rank)`` on matrices, Rademacher elsewhere; kept as ``"lowrank:<rank>"``).
        rank: the rank of low-rank directions (default 1); only with ``kind="lowrank"``.
        lazy_steps: low-rank directions only: keep each direction's factor B for this many steps while A
            is drawn fresh every step (LOZO's lazy sampling); above 1 the kind becomes
            ``"lowrank:<rank>:lazy"``. 1 (default): both factors fresh every step.
        seed: run seed (non-negative integer): direction seeds are a hash of (seed, step, index).
    """

    lr: float
    eps: float = 1e-3
    weight_decay: float = 0.0
    kind: str = RADEMACHER
    seed: int = 0
    rank: int | None = None
    lazy_steps: int = 1

    def __post_init__(self) -> None:
        self._set("lr", check_real(self.lr, "lr", low=0.0))
        self._set("eps", check_real(self.eps, "eps", low=0.0, low_open=True))
        self._set("weight_decay", check_real(self.weight_decay, "weight_decay", low=0.0))
        try:
            self._set("kind", check_direction_kind(self.kind, self.rank))
        except (ValueError, TypeError) as err:
            raise ValueError(f"kind: {err}") from None
        self._set("rank", rank_of(self.kind) if is_lowrank(self.kind) else None)
        self._set("lazy_steps", check_int(self.lazy_steps, "lazy_steps", low=1))
        if self.lazy_steps > 1:
            if not is_lowrank(self.kind):
                raise ValueError(f"lazy_steps={self.lazy_steps} keeps a low-rank factor for several steps; kind "
                                 f"{self.kind!r} has no factors (use kind='lowrank')")
            self._set("kind", lowrank_kind(self.rank, lazy=True))
        self._set("seed", check_int(self.seed, "seed", low=0, high=MAX_RUN_SEED))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ZOConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no settings {unknown}; it has {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_settings(cls, owner: str, **settings) -> ZOConfig:
        """Build from keyword settings, naming the valid ones when one is unknown."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in settings if k not in names)
        if unknown:
            raise TypeError(f"{owner} has no setting {', '.join(map(repr, unknown))}; its settings are {names}")
        if settings.get("lr") is None:
            raise TypeError(f"{owner} needs a learning rate: pass lr=...")
        return cls(**settings)

    def differences(self, saved: dict, keys=None) -> list[str]:
        """Human-readable ``name: saved -> here`` for every setting that differs from ``saved``
        (only ``keys``, when given)."""
        mine = self.to_dict()
        keys = sorted(set(mine) | set(saved) if keys is None else keys)
        return [f"{k}: saved {saved.get(k, '<absent>')!r}, here {mine.get(k, '<absent>')!r}"
                for k in keys if saved.get(k, "<absent>") != mine.get(k, "<absent>")]
