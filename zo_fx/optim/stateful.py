"""Updates that keep state per parameter: ZO-SGD with momentum, ZO-Adam and HiZOO.

Both take MeZO's estimate ``g = sum_i c_i u_i`` (regenerated from the record's seeds, never stored)
and fold it into buffers the size of the parameter, in float32 (float64 for float64 parameters):

* ``"momentum"`` (ZO-SGD-MMT as ZO-Bench runs it): ``m = beta m + g``,
  ``theta -= lr (m + wd theta)``. One buffer.
* ``"zoadam"`` (ZO-Adam, Adam's rule on the ZO estimate): ``m = b1 m + (1 - b1) g``,
  ``v = b2 v + (1 - b2) g^2``, ``theta -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd theta)``
  with ``t`` the number of updates so far. Two buffers.
* ``"hizoo"`` (HiZOO's diagonal curvature): ``H = H ((1 - alpha) + alpha c z^2)`` with ``c`` the record's
  ``curvature`` (``|l+ + l- - 2 l0| / (2 eps^2)``), then ``theta -= lr (p z / sqrt(H) + wd theta)``. One
  buffer, ``H``, starting at ones; it also scales the next step's perturbation
  (:mod:`zo_fx.kernels.scaling`).

What a bit-exact replay needs: the records (seeds, coefficients, lr) in order from the first, and
the constants (``betas``, ``adam_eps``, weight decay); the buffers are rebuilt as the run built
them, so a replay starts at record 0 (:func:`zo_fx.optim.trajectory.replay` refuses another start).
A resumed run reloads them from its checkpoint (``state.safetensors``).
"""

from __future__ import annotations

import math

import torch

from zo_fx import kernels
from zo_fx.kernels._chunks import accumulation_dtype
from zo_fx.kernels.scaling import direction_factor

#: record modes that read and advance per-parameter buffers, and the buffers each keeps
STATEFUL_MODES = {"momentum": ("m",), "zoadam": ("m", "v"), "hizoo": ("h",)}


def estimate(param: torch.Tensor, seeds, coefs, pid: int, kind: str, impl: str) -> torch.Tensor:
    """``sum_i coefs[i] * u(seeds[i])`` shaped like ``param``, in its accumulation dtype."""
    g = torch.zeros(param.shape, dtype=accumulation_dtype(param.dtype), device=param.device)
    return kernels.fused_update_(g, seeds, coefs, pid, kind, lr=-1.0, impl=impl)  # 0 - (-1) * sum = sum


def apply_record(rec: dict, param: torch.Tensor, buffers: dict, pid: int, kind: str, impl: str, weight_decay: float,
                 betas, adam_eps: float, t: int) -> None:
    """Stateful record ``rec`` (the ``t``-th update) applied to ``param`` in place, advancing ``buffers``.

    The momentum and ZO-Adam records fold their estimate ``sum_i c_i u_i`` into the buffers; HiZOO's needs the
    direction ``z`` itself (its curvature EMA reads ``z^2``) with the record's ``curvature`` and ``betas[0]``
    (its alpha).
    """
    if rec["mode"] == "hizoo":
        z = estimate(param, rec["seeds"], [1.0], pid, kind, impl)
        apply_hizoo(param, buffers, z, rec["coefs"][0], rec["curvature"], betas[0], rec["lr"], weight_decay)
        return
    g = estimate(param, rec["seeds"], rec["coefs"], pid, kind, impl)
    apply_stateful(rec["mode"], param, buffers, g, rec["lr"], weight_decay, betas, adam_eps, t)


def apply_stateful(mode: str, param: torch.Tensor, buffers: dict, g: torch.Tensor, lr: float, weight_decay: float,
                   betas, adam_eps: float, t: int) -> None:
    """One update of ``param`` in place from the estimate ``g``, advancing ``buffers`` (created when empty)."""
    for name in STATEFUL_MODES[mode]:
        if name not in buffers:
            buffers[name] = torch.zeros_like(g)
    if mode == "momentum":
        buffers["m"].mul_(betas[0]).add_(g)
        step = buffers["m"]
    else:
        b1, b2 = betas
        buffers["m"].mul_(b1).add_(g, alpha=1.0 - b1)
        buffers["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (buffers["v"] / (1.0 - b2 ** t)).sqrt_().add_(adam_eps)
        step = buffers["m"] / (1.0 - b1 ** t) / denom
    p = param.to(g.dtype)
    param.copy_((p - lr * (step + weight_decay * p)).to(param.dtype))


def apply_hizoo(param: torch.Tensor, buffers: dict, z: torch.Tensor, coef: float, curvature: float, alpha: float,
                lr: float, weight_decay: float) -> None:
    """HiZOO's update of ``param`` in place from its direction ``z``: the curvature EMA, then the scaled step."""
    h = buffers.get("h")
    if h is None:
        h = buffers["h"] = torch.ones_like(z)
    h.mul_(z.square().mul_(alpha * curvature).add_(1.0 - alpha))
    step = z.mul_(direction_factor(h, z.dtype)).mul_(coef)
    p = param.to(z.dtype)
    param.copy_((p - lr * (step + weight_decay * p)).to(param.dtype))


def step_bound(mode: str, buffers: dict, coef_sum: float, direction_max: float, betas, t: int) -> float:
    """The largest magnitude the step (before ``lr``) can give one element, for the overflow guard."""
    if mode == "hizoo":  # H only grows by its added term: 1/sqrt(H_new) <= 1/sqrt((1 - alpha) min H)
        h = buffers.get("h")
        smallest = float(h.min()) if h is not None and h.numel() else 1.0
        floor = (1.0 - betas[0]) * smallest
        return coef_sum * direction_max / math.sqrt(floor) if floor > 0 else math.inf
    if mode == "momentum":
        m = buffers.get("m")
        previous = 0.0 if m is None else float(m.abs().max()) if m.numel() else 0.0
        return betas[0] * previous + coef_sum * direction_max
    b1, b2 = betas  # |m_hat| / sqrt(v_hat) over any history, with b1 < sqrt(b2)
    ratio = b1 / math.sqrt(b2) if b2 > 0 else math.inf
    if ratio >= 1:
        return math.inf
    return (1 - b1) / math.sqrt(1 - b2) / (1 - ratio) * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
