"""Trajectories: a training run as seeds and coefficients, replayable bit for bit.

Every zo_fx update is a function of (seeds, coefficients, learning rate) and of the
frozen direction streams (docs/directions.md), so a run of thousands of steps is
kilobytes of JSON. ``replay(model, trajectory)`` applies the recorded updates to a
fresh copy of the base model with the very same fused update functions the optimizer
used, which is why the result is bit-identical (same device and dtype). The update runs
through ``zo_fx.kernels`` with the ``impl`` the caller gives (the optimizer passes the
one its module was compiled with; ``"auto"``: the Triton kernel for CUDA tensors, the
torch reference elsewhere), so training and replay on one device take the same path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zo_fx import kernels
from zo_fx.files import atomic_write_json

FORMAT_VERSION = 1


@dataclass
class ParamSpec:
    name: str
    pid: int
    decay: bool


@dataclass
class Trajectory:
    """The method's constants plus one record per applied update."""

    method: str
    kind: str
    params: list[ParamSpec]
    weight_decay: float = 0.0
    #: AdaMeZO only
    horizon: int = 0
    betas: tuple[float, float] = (0.7, 0.9)
    ada_scale: float = 100.0
    adam_eps: float = 1e-5
    #: {"step", "seeds", "coefs", "lr", "mode": "linear" | "adamezo"}
    records: list[dict] = field(default_factory=list)

    # ---- applying updates -------------------------------------------------------------------------------
    def window(self, upto: int) -> tuple[list[int], list[float]]:
        """The last ``horizon`` (seed, coef) pairs among records[:upto+1], most recent first."""
        seeds, coefs = [], []
        for rec in reversed(self.records[: upto + 1]):
            for s, c in zip(reversed(rec["seeds"]), reversed(rec["coefs"])):
                seeds.append(s)
                coefs.append(c)
                if len(seeds) == self.horizon:
                    return seeds, coefs
        return seeds, coefs

    def constants(self) -> dict:
        """The method's constants: what every record is applied with."""
        return {"method": self.method, "kind": self.kind, "weight_decay": self.weight_decay,
                "horizon": self.horizon, "betas": tuple(self.betas), "ada_scale": self.ada_scale,
                "adam_eps": self.adam_eps}

    def apply(self, tensors: dict[str, torch.Tensor], index: int, *, impl: str = "auto") -> None:
        """Apply record ``index`` to ``tensors`` (name -> parameter), in place, through ``impl``."""
        rec = self.records[index]
        with torch.no_grad():
            if rec.get("mode", "linear") == "adamezo":
                seeds, coefs = self.window(index)
                for spec in self.params:
                    kernels.adamezo_update_(
                        tensors[spec.name].data, seeds, coefs, spec.pid, self.kind, rec["lr"], self.betas,
                        self.weight_decay if spec.decay else 0.0, self.ada_scale, self.adam_eps, impl=impl,
                    )
            else:
                for spec in self.params:
                    kernels.fused_update_(
                        tensors[spec.name].data, rec["seeds"], rec["coefs"], spec.pid, self.kind, rec["lr"],
                        self.weight_decay if spec.decay else 0.0, impl=impl,
                    )

    # ---- persistence ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION, "method": self.method, "kind": self.kind,
            "params": [[p.name, p.pid, p.decay] for p in self.params],
            "weight_decay": self.weight_decay, "horizon": self.horizon, "betas": list(self.betas),
            "ada_scale": self.ada_scale, "adam_eps": self.adam_eps, "records": self.records,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported trajectory format {d.get('format')!r}; this zo_fx reads {FORMAT_VERSION}")
        return cls(
            method=d["method"], kind=d["kind"], params=[ParamSpec(*p) for p in d["params"]],
            weight_decay=d["weight_decay"], horizon=d["horizon"], betas=tuple(d["betas"]),
            ada_scale=d["ada_scale"], adam_eps=d["adam_eps"], records=[dict(r) for r in d["records"]],
        )

    def save(self, path) -> Path:
        """Write JSON atomically (a crash mid-write leaves the previous file intact)."""
        return atomic_write_json(path, self.to_dict(), separators=(",", ":"))

    @classmethod
    def load(cls, path) -> Trajectory:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trajectory at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def __len__(self) -> int:
        return len(self.records)


def replay(model: torch.nn.Module, trajectory: Trajectory, start: int = 0, stop: int | None = None, *,
           impl: str = "auto") -> torch.nn.Module:
    """Apply ``trajectory``'s updates [start, stop) to ``model`` in place and return it.

    ``model`` must be the base model the run started from (or the result of replaying
    the first ``start`` records); parameters are matched by name. ``impl`` as the run's
    ``zo_compile`` had it gives the bit-identical result.
    """
    tensors = dict(model.named_parameters())
    missing = [p.name for p in trajectory.params if p.name not in tensors]
    if missing:
        raise KeyError(f"the model has no parameters named {missing[:5]}; replay needs the model the run trained")
    for i in range(start, len(trajectory) if stop is None else stop):
        trajectory.apply(tensors, i, impl=impl)
    return model
