"""Finite weights or a refused step: the update is checked against the weights' dtype range before it is applied.

An update ``theta -= lr * (sum_i c_i u_i + wd * theta)`` can push a weight past the largest
value of its dtype (float16 at a large lr), and an infinite weight poisons every later step.
Rolling such a step back bit-exactly would need a copy of every weight, so the guard decides
*before* anything is written, from a bound that holds for every element:

    |theta'| <= |theta| * (1 + lr * wd) + lr * S

with ``S`` the largest magnitude a step direction can have: ``sum_i |c_i| * umax`` for a linear
step (``umax`` = 1 for Rademacher signs, the largest Box-Muller value from a 24-bit uniform for
Gaussian ones), ``scale * sqrt(sum_j b1^(2j) / b2^j)`` for an AdaMeZO step (Cauchy-Schwarz on
``m / sqrt(v)``). ``max |theta|`` is read once per parameter and step (one pass, no copy:
``aminmax``). Where the bound stays below half the dtype's largest value, the update cannot
overflow and is applied as is: the normal case costs one read of the weights. A parameter
whose bound does not is *tried* first on a scratch copy (one parameter at a time); if any trial
is non-finite, the step is refused with nothing written, so the weights stay bit-identical.
"""

from __future__ import annotations

import math

import torch

from zo_fx.optim.stateful import STATEFUL_MODES, step_bound
from zo_fx.streams.layout import GAUSSIAN, is_lowrank, rank_of

#: the largest |z| of a Gaussian direction element: sqrt(-2 ln 2**-24) = 5.77 (u1 >= 2**-24), with margin
GAUSSIAN_MAX = 6.0
#: a bound above this share of the dtype's largest value is tried before it is applied (float32 rounding
#: in the update and in the bound itself stays far inside the factor of two)
SAFE_SHARE = 0.5


def direction_max(kind: str) -> float:
    """The largest magnitude one element of a direction of ``kind`` can have."""
    if is_lowrank(kind):  # a sum of r signs, over sqrt(r)
        return math.sqrt(rank_of(kind))
    return GAUSSIAN_MAX if kind == GAUSSIAN else 1.0


def step_max(trajectory, record: dict) -> float:
    """The largest magnitude of the step (before ``lr``) that ``record`` adds to any element."""
    if record.get("mode", "linear") == "adamezo":
        b1, b2 = trajectory.betas
        ratio = sum((b1 * b1 / b2) ** j for j in range(trajectory.horizon)) if b2 > 0 else math.inf
        return float(trajectory.ada_scale) * math.sqrt(ratio)
    return sum(abs(float(c)) for c in record["coefs"]) * direction_max(trajectory.kind)


def largest_magnitude(t: torch.Tensor) -> float:
    """``max |t|`` as a float (NaN when ``t`` holds a NaN), read without a temporary copy."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi)) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def check_settings_fit(config, params: dict[str, torch.Tensor]) -> None:
    """Refuse an lr or eps that the trainable weights' dtype cannot hold (float16 ends at 65504).

    A perturbation ``eps * u`` above the largest value turns every perturbed weight infinite, and an
    lr above it overflows any step with a coefficient of one; both are settings mistakes, named here.
    """
    for dtype in sorted({p.dtype for p in params.values() if p.is_floating_point()}, key=str):
        top = torch.finfo(dtype).max
        if config.lr > top:
            raise ValueError(f"lr {config.lr:g} is above the largest {dtype} value ({top:g}): every step with a "
                             f"coefficient near 1 would overflow the weights; use a smaller lr or a wider dtype")
        if config.eps * direction_max(config.kind) > SAFE_SHARE * top:
            raise ValueError(f"eps {config.eps:g} perturbs {dtype} weights past their range ({top:g}); "
                             "use a smaller eps")


def apply_checked(trajectory, params: dict[str, torch.Tensor], index: int, impl: str,
                  state: dict | None = None) -> str | None:
    """Apply record ``index`` to ``params`` unless it would make a weight non-finite; then return why not.

    Returns None when the update was applied. Otherwise nothing was written (weights and ``state``,
    the buffers of a stateful method) and the string names the parameters and the bound, for the
    step's skip reason.
    """
    record = trajectory.records[index]
    lr, step = float(record["lr"]), step_max(trajectory, record)
    stateful = record.get("mode") in STATEFUL_MODES
    risky, bad = [], []
    for spec in trajectory.params:
        p = params[spec.name]
        now = largest_magnitude(p)
        if not math.isfinite(now):
            bad.append(f"{spec.name} (already non-finite)")
            continue
        wd = trajectory.weight_decay if spec.decay else 0.0
        if stateful:
            step = step_bound(record["mode"], state.get(spec.name, {}), sum(abs(float(c)) for c in record["coefs"]),
                              direction_max(trajectory.kind), trajectory.betas, index + 1)
        bound = now * (1.0 + lr * wd) + lr * step
        if not bound <= SAFE_SHARE * torch.finfo(p.dtype).max:
            risky.append(spec.name)
    if bad:
        return f"the weights are already non-finite: {_names(bad)}"
    for name in risky:  # a trial on a scratch copy of this one parameter
        trial = {name: params[name].detach().clone()}
        scratch = {name: {k: v.clone() for k, v in state.get(name, {}).items()}} if stateful else None
        trajectory.apply(trial, index, impl=impl, only=[name], state=scratch)
        if not bool(torch.isfinite(trial[name]).all()):
            return (f"the update (lr {lr:g}, largest step element {lr * step:.3g}) would make {name} non-finite "
                    f"in {params[name].dtype}")
    trajectory.apply(params, index, impl=impl, state=state)
    return None


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
