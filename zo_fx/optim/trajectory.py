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

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zo_fx import kernels
from zo_fx.checks import check_int, check_real
from zo_fx.files import atomic_write_json
from zo_fx.optim.stateful import STATEFUL_MODES, apply_record
from zo_fx.streams.layout import KINDS, check_direction_kind

#: 2: parameter shapes, dtypes and tied names, and a checksum of the content
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MODES = ("linear", "adamezo", *STATEFUL_MODES)


class TrajectoryError(ValueError):
    """A trajectory file or dict that is damaged, tampered with, or does not fit the model."""


@dataclass
class ParamSpec:
    name: str
    pid: int
    decay: bool
    #: what the parameter was when the run trained it (None in format-1 files)
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    #: the other names of the same tensor (tied weights)
    aliases: tuple[str, ...] = ()

    def to_list(self) -> list:
        return [self.name, self.pid, self.decay, list(self.shape or []), self.dtype, list(self.aliases)]


def tensor_specs(model: torch.nn.Module, entries) -> list[ParamSpec]:
    """The spec of each ``(name, pid, decay)`` of ``entries``: the parameter's shape, dtype and tied names."""
    named = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for n, p in named.items():
        names_of.setdefault(id(p), []).append(n)
    specs = []
    for name, pid, decay in entries:
        tensor = named[name]
        aliases = tuple(sorted(n for n in names_of[id(tensor)] if n != name))
        specs.append(ParamSpec(name, pid, decay, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                               aliases))
    return specs


def spec_differences(specs: list[ParamSpec], model: torch.nn.Module) -> list[str]:
    """How ``model``'s parameters differ from the ones a trajectory was recorded on (names, shapes, dtypes, ties)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    missing = [spec for spec in specs if spec.name not in named]
    present = [spec for spec in specs if spec.name in named]
    diffs = [f"no parameter {spec.name!r}" for spec in missing]
    for spec, here in zip(present, tensor_specs(model, [(s.name, s.pid, s.decay) for s in present])):
        if spec.shape is not None and tuple(spec.shape) != here.shape:
            diffs.append(f"{spec.name}: shape {list(here.shape)}, the run had {list(spec.shape)}")
        if spec.dtype is not None and spec.dtype != here.dtype:
            diffs.append(f"{spec.name}: dtype {here.dtype}, the run had {spec.dtype}")
        if spec.shape is not None and tuple(spec.aliases) != here.aliases:
            diffs.append(f"{spec.name}: tied to {list(here.aliases) or 'nothing'}, in the run to "
                         f"{list(spec.aliases) or 'nothing'}")
    return diffs


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Every parameter of the model (frozen ones too) as a count and a hash of names, shapes and dtypes."""
    named = list(model.named_parameters(remove_duplicate=False))
    text = ";".join(f"{n}:{list(p.shape)}:{p.dtype}" for n, p in sorted(named, key=lambda kv: kv[0]))
    return {"tensors": len(named), "elements": sum(p.numel() for _, p in named),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


#: the methods whose steps a trajectory records (each step's update from its seeds and coefficients)
TRAJECTORY_METHODS = ("mezo", "fzoo", "adamezo", "es", "zosgd_momentum", "zoadam", "hizoo")


def content_checksum(d: dict) -> str:
    """sha256 of a trajectory dict's content (every field but the checksum), canonical JSON."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    #: :func:`model_fingerprint` of the model the run trained (None in format-1 files)
    model: dict | None = None

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

    def apply(self, tensors: dict[str, torch.Tensor], index: int, *, impl: str = "auto",
              shards: dict[str, tuple[int, int]] | None = None, only: list[str] | None = None,
              state: dict | None = None) -> None:
        """Apply record ``index`` to ``tensors`` (name -> parameter), in place, through ``impl``.

        ``shards`` (name -> (start, total)): ``tensors[name]`` is only the flat elements
        ``[start, start + numel)`` of a parameter of ``total`` elements (a rank's shard); its
        elements are updated exactly as the whole parameter's would be, bit for bit. A name
        listed in ``shards`` but absent from ``tensors`` is skipped (this rank holds none of it).
        ``only``: apply to these parameters alone (the others need not be in ``tensors``).
        ``state`` (name -> buffers): what a stateful record (momentum, ZO-Adam; see
        :mod:`zo_fx.optim.stateful`) reads and advances; it must hold the buffers as record
        ``index - 1`` left them (empty before record 0).
        """
        rec = self.records[index]
        mode = rec.get("mode", "linear")
        if mode in STATEFUL_MODES:
            self._apply_stateful(tensors, index, impl, shards, only, state)
            return
        shards = shards or {}
        placed = {name: dict(zip(("start", "total"), shards[name])) if name in shards else {} for name in
                  (spec.name for spec in self.params)}
        specs = [spec for spec in self.params if (spec.name in tensors or spec.name not in shards)
                 and (only is None or spec.name in only)]
        with torch.no_grad():
            if rec.get("mode", "linear") == "adamezo":
                seeds, coefs = self.window(index)
                for spec in specs:
                    kernels.adamezo_update_(
                        tensors[spec.name].data, seeds, coefs, spec.pid, self.kind, rec["lr"], self.betas,
                        self.weight_decay if spec.decay else 0.0, self.ada_scale, self.adam_eps, impl=impl,
                        **placed[spec.name],
                    )
            else:
                for spec in specs:
                    kernels.fused_update_(
                        tensors[spec.name].data, rec["seeds"], rec["coefs"], spec.pid, self.kind, rec["lr"],
                        self.weight_decay if spec.decay else 0.0, impl=impl, **placed[spec.name],
                    )

    def _apply_stateful(self, tensors, index: int, impl: str, shards, only, state) -> None:
        rec = self.records[index]
        if state is None:
            raise TrajectoryError(f"record {index} is a {rec['mode']} update: it needs the optimizer's state "
                                  "(state=...); replay() rebuilds it from record 0")
        if shards:
            raise TrajectoryError(f"{rec['mode']} updates keep buffers per whole parameter; they do not take shards")
        with torch.no_grad():
            for spec in self.params:
                if only is not None and spec.name not in only:
                    continue
                apply_record(rec, tensors[spec.name].data, state.setdefault(spec.name, {}), spec.pid, self.kind, impl,
                             self.weight_decay if spec.decay else 0.0, self.betas, self.adam_eps, index + 1)

    @property
    def stateful(self) -> bool:
        """Whether any record reads per-parameter buffers (replay must then start at record 0)."""
        return any(rec.get("mode") in STATEFUL_MODES for rec in self.records)

    # ---- persistence ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "format": FORMAT_VERSION, "method": self.method, "kind": self.kind,
            "params": [p.to_list() for p in self.params],
            "weight_decay": self.weight_decay, "horizon": self.horizon, "betas": list(self.betas),
            "ada_scale": self.ada_scale, "adam_eps": self.adam_eps, "records": self.records, "model": self.model,
        }
        d["checksum"] = content_checksum(d)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        """A trajectory from its dict, every field checked; a format-2 dict must match its checksum."""
        try:
            return _parse(d)
        except TrajectoryError:
            raise
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise TrajectoryError(f"the trajectory is malformed: {type(err).__name__}: {err}") from None

    def save(self, path) -> Path:
        """Write JSON atomically (a crash mid-write leaves the previous file intact)."""
        return atomic_write_json(path, self.to_dict(), separators=(",", ":"))

    @classmethod
    def load(cls, path) -> Trajectory:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trajectory at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TrajectoryError(f"{path} is not a complete trajectory file (truncated or not JSON: {err})") from None
        try:
            return cls.from_dict(d)
        except TrajectoryError as err:
            raise TrajectoryError(f"{path}: {err}") from None

    def __len__(self) -> int:
        return len(self.records)


def replay(model: torch.nn.Module, trajectory: Trajectory, start: int = 0, stop: int | None = None, *,
           impl: str = "auto") -> torch.nn.Module:
    """Apply ``trajectory``'s updates [start, stop) to ``model`` in place and return it.

    ``model`` must be the base model the run started from (or the result of replaying
    the first ``start`` records); parameters are matched by name. ``impl`` as the run's
    ``zo_compile`` had it gives the bit-identical result.
    """
    diffs = spec_differences(trajectory.params, model)
    here = model_fingerprint(model)
    if trajectory.model is not None and not diffs and here != trajectory.model:
        diffs.append(f"the run's model had {trajectory.model['tensors']} parameter tensors of "
                     f"{trajectory.model['elements']:,} elements, this one has {here['tensors']} of "
                     f"{here['elements']:,}" if here["tensors"] != trajectory.model["tensors"] or
                     here["elements"] != trajectory.model["elements"] else
                     "its parameters' names, shapes or dtypes differ from the run's model")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise TrajectoryError(
            f"this model is not the one the trajectory was recorded on ({shown}); replay needs the base model "
            "the run started from, with the same parameter names, shapes, dtypes and tied weights"
        )
    tensors = dict(model.named_parameters())
    if trajectory.stateful and start != 0:
        raise TrajectoryError(f"this {trajectory.method} trajectory keeps momentum buffers, rebuilt from its first "
                              f"record: replay it from start=0, not {start}")
    state = {} if trajectory.stateful else None
    for i in range(start, len(trajectory) if stop is None else stop):
        trajectory.apply(tensors, i, impl=impl, state=state)
    return model


def _parse(d) -> Trajectory:
    if not isinstance(d, dict):
        raise TrajectoryError(f"a trajectory is a JSON object; got {type(d).__name__}")
    fmt = d.get("format")
    if fmt not in READABLE_FORMATS:
        raise TrajectoryError(f"unsupported trajectory format {fmt!r}; this zo_fx reads {READABLE_FORMATS}")
    if fmt >= 2:
        if d.get("checksum") != content_checksum(d):
            raise TrajectoryError("its content does not match its checksum: the file was changed after it was written")
    method, kind = d["method"], d["kind"]
    if method not in TRAJECTORY_METHODS:
        raise TrajectoryError(f"method {method!r} is not one of {', '.join(TRAJECTORY_METHODS)}")
    try:
        kind = check_direction_kind(kind)
    except (ValueError, TypeError):
        raise TrajectoryError(
            f"kind {kind!r} is not one of {KINDS}, 'lowrank:<rank>' or 'lowrank:<rank>:lazy'") from None
    params = [_param(p, fmt) for p in d["params"]]
    if not params:
        raise TrajectoryError("it lists no parameters: replaying it would change nothing")
    for what, values in (("name", [p.name for p in params]), ("stream id", [p.pid for p in params])):
        if len(set(values)) != len(values):
            raise TrajectoryError(f"two parameters share a {what}")
    horizon = check_int(d["horizon"], "horizon", low=0)
    records = [_record(r, i, horizon) for i, r in enumerate(d["records"])]
    betas = tuple(check_real(b, "betas", low=0.0, high=1.0, high_open=True) for b in d["betas"])
    if len(betas) != 2:
        raise TrajectoryError(f"betas must be two numbers; got {d['betas']!r}")
    return Trajectory(
        method=method, kind=kind, params=params, weight_decay=check_real(d["weight_decay"], "weight_decay", low=0.0),
        horizon=horizon, betas=betas, ada_scale=check_real(d["ada_scale"], "ada_scale", low=0.0, low_open=True),
        adam_eps=check_real(d["adam_eps"], "adam_eps", low=0.0, low_open=True), records=records,
        model=_fingerprint(d.get("model")) if fmt >= 2 else None,
    )


def _fingerprint(m) -> dict | None:
    if m is None:
        return None
    if not isinstance(m, dict) or set(m) != {"tensors", "elements", "sha256"}:
        raise TrajectoryError(f"model fingerprint {m!r} is not {{tensors, elements, sha256}}")
    return {"tensors": check_int(m["tensors"], "model tensors", low=0),
            "elements": check_int(m["elements"], "model elements", low=0), "sha256": str(m["sha256"])}


def _param(p, fmt: int) -> ParamSpec:
    name, pid, decay = p[0], check_int(p[1], "parameter stream id", low=0, high=2**32 - 1), p[2]
    if not isinstance(name, str) or not name or not isinstance(decay, bool):
        raise TrajectoryError(f"parameter entry {p!r} is not [name, stream id, decays]")
    if fmt < 2:
        return ParamSpec(name, pid, decay)
    shape = tuple(check_int(n, f"{name} shape", low=0) for n in p[3])
    if not isinstance(p[4], str) or not isinstance(getattr(torch, p[4], None), torch.dtype):
        raise TrajectoryError(f"{name}: dtype {p[4]!r} is not a torch dtype")
    if not all(isinstance(a, str) for a in p[5]):
        raise TrajectoryError(f"{name}: tied names {p[5]!r} are not names")
    return ParamSpec(name, pid, decay, shape, p[4], tuple(p[5]))


def _record(r, index: int, horizon: int) -> dict:
    where = f"record {index}"
    if not isinstance(r, dict):
        raise TrajectoryError(f"{where} is not an object")
    seeds, coefs = r["seeds"], r["coefs"]
    if not isinstance(seeds, list) or not isinstance(coefs, list) or len(seeds) != len(coefs) or not seeds:
        raise TrajectoryError(f"{where}: seeds and coefs must be two non-empty lists of one length")
    for s in seeds:
        check_int(s, f"{where} seed", low=0, high=2**64 - 1)
    for c in coefs:
        check_real(c, f"{where} coefficient")
    check_real(r["lr"], f"{where} lr", low=0.0)
    check_int(r["step"], f"{where} step", low=0)
    mode = r.get("mode", "linear")
    if mode not in MODES:
        raise TrajectoryError(f"{where}: mode {mode!r} is not one of {MODES}")
    if mode == "hizoo":
        check_real(r.get("curvature"), f"{where} curvature", low=0.0)
        if len(seeds) != 1:
            raise TrajectoryError(f"{where} is a HiZOO update of one direction; it has {len(seeds)}")
    if mode == "adamezo" and horizon < 1:
        raise TrajectoryError(f"{where} is an AdaMeZO update but the horizon is {horizon}")
    return dict(r)
