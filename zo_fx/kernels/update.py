"""In-place multi-direction updates: one read and one write of every parameter element.

* ``fused_update_``: ``param -= lr * (sum_i coefs[i] u_i + weight_decay * param)``, the
  MeZO / FZOO step, same semantics as :func:`zo_fx.runtime.generate.apply_update_`
  (which is its torch reference).
* ``adamezo_update_``: the AdaMeZO step over the last K directions (most recent first),
  ``m = sum_j b1^j c_j u_j``, ``v = sum_j b2^j c_j^2 u_j^2``,
  ``param -= lr * (scale * m / (sqrt(v) + adam_eps) + weight_decay * param)``; the
  moments are rebuilt from the seeds each step, never stored (AdaMeZO's "cached Philox
  state"). Its torch reference is ``adamezo_update_reference_`` below.

The kernel gives each program ``BLOCK`` consecutive elements (a multiple of 128, so every
program starts on a Philox block of both streams), loads them once, regenerates every
direction on them in registers (``philox.direction_tile``, the aligned path), and writes
them once. Accumulation is float32 for float32, bfloat16 and float16 parameters, and
the result is rounded once, exactly as the torch path does for them. float64 parameters
(which the torch path accumulates in float64) are not taken by the kernel:
:func:`zo_fx.kernels.pick` sends them to the reference, since no GPU training run keeps
float64 weights and float64 Philox/Box-Muller would be needlessly slow.
"""

from collections.abc import Sequence

import torch

from zo_fx.runtime.directions import check_kind
from zo_fx.runtime.generate import apply_adamezo_update_, apply_update_

from . import pick
from ._support import interpreting, key_words, tl, triton
from .philox import KIND_CODE, direction_tile, load_key, round_to

#: elements per program; a multiple of 128 (one Rademacher block). The update is
#: memory-bound for a few directions, so a moderate block with 4 warps suffices.
_BLOCK = 1024
#: chunk of the torch AdaMeZO reference (a multiple of 128)
_REFERENCE_CHUNK = 1 << 20


@triton.jit
def _update_kernel(
    p_ptr, keys_ptr, coef_ptr, b1_ptr, b2_ptr, n_dirs, numel, lr, weight_decay, step_scale, adam_eps,
    KIND: tl.constexpr, ADAM: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # the block as [BLOCK / 128, 128] rows of consecutive elements, each starting on a Philox block
    row_start = start + 128 * tl.arange(0, BLOCK // 128).to(tl.int64)
    lanes = tl.arange(0, 128)
    m = tl.full((BLOCK,), 0.0, tl.float32)
    v = tl.full((BLOCK,), 0.0, tl.float32)
    for i in range(n_dirs):
        seed_lo, seed_hi, pid = load_key(keys_ptr, i)
        u = tl.reshape(direction_tile(row_start, lanes, 0, 1, seed_lo, seed_hi, pid, KIND, True), (BLOCK,))
        g = tl.load(coef_ptr + i) * u
        if ADAM:  # direction i is i steps old: weights b1**i, b2**i
            m = m + tl.load(b1_ptr + i) * g
            v = v + tl.load(b2_ptr + i) * (g * g)
        else:
            m = m + g
    if ADAM:
        step = step_scale * m / (tl.sqrt(v) + adam_eps)
    else:
        step = m
    new = p - lr * (step + weight_decay * p)
    tl.store(p_ptr + offs, round_to(new, p_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _launch(
    param, seeds, coefs, pid, kind, lr, weight_decay, betas=None, step_scale=1.0, adam_eps=0.0
) -> None:
    """One kernel launch; ``betas`` given means the AdaMeZO step."""
    dev = param.device
    f32 = lambda values: torch.tensor(values, dtype=torch.float32, device=dev)  # noqa: E731
    k = len(seeds)
    b1, b2 = betas if betas is not None else (1.0, 1.0)
    n = param.numel()
    _update_kernel[(triton.cdiv(n, _BLOCK),)](
        param, key_words(seeds, pid, dev), f32([float(c) for c in coefs]),
        f32([float(b1) ** j for j in range(k)]), f32([float(b2) ** j for j in range(k)]),
        k, n, float(lr), float(weight_decay), float(step_scale), float(adam_eps),
        KIND=KIND_CODE[kind], ADAM=betas is not None, INTERPRETED=interpreting(), BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip


def _check(param: torch.Tensor, seeds, coefs) -> None:
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefficients")
    if not param.is_contiguous():
        raise ValueError(
            "the fused updates need a contiguous parameter (its storage order is the element order)"
        )


@torch.no_grad()
def fused_update_(
    param: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    pid: int,
    kind: str,
    lr: float,
    weight_decay: float = 0.0,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``param -= lr * (sum_i coefs[i] * u(seeds[i], pid) + weight_decay * param)``, in place.

    Args:
        param: the contiguous parameter (updated in place and returned).
        seeds, coefs: one coefficient per direction seed.
        pid: the parameter's stream id.
        kind: ``"rademacher"`` or ``"gaussian"``.
        lr, weight_decay: as in the formula.
        impl: ``"auto"``, ``"torch"`` (:func:`zo_fx.runtime.generate.apply_update_`) or
            ``"triton"``; see :func:`zo_fx.kernels.pick`.

    Example:
        >>> p = torch.zeros(4)
        >>> fused_update_(p, [7], [2.0], 1, "rademacher", lr=0.5).abs().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    kind = check_kind(kind)
    _check(param, seeds, coefs)
    if pick(impl, param) == "torch":
        return apply_update_(param, seeds, coefs, pid, kind, lr, weight_decay)
    if param.numel() and (len(seeds) or weight_decay != 0.0):
        _launch(param, seeds, coefs, pid, kind, lr, weight_decay)
    return param


@torch.no_grad()
def adamezo_update_(
    param: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    pid: int,
    kind: str,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float = 0.0,
    scale: float = 100.0,
    adam_eps: float = 1e-5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """The AdaMeZO step on one parameter, in place, from the last K (seed, coef) pairs.

    Args:
        param: the contiguous parameter (updated in place and returned).
        seeds, coefs: the last K directions and their projected gradients, most recent first.
        pid, kind: the parameter's stream id and the direction kind.
        lr: learning rate.
        betas: (b1, b2), the decay of the first and second moment over the window.
        weight_decay: decoupled from the adaptive step, as in the formula.
        scale: the constant the AdaMeZO reference multiplies the step by (100).
        adam_eps: added to sqrt(v).
        impl: ``"auto"``, ``"torch"`` (:func:`zo_fx.runtime.generate.apply_adamezo_update_`) or ``"triton"``.
    """
    kind = check_kind(kind)
    _check(param, seeds, coefs)
    if len(betas) != 2:
        raise ValueError(f"betas must be (b1, b2); got {betas!r}")
    if pick(impl, param) == "torch":
        return apply_adamezo_update_(param, seeds, coefs, pid, kind, lr, betas, weight_decay, scale, adam_eps)
    if param.numel():
        _launch(param, seeds, coefs, pid, kind, lr, weight_decay, betas, scale, adam_eps)
    return param


__all__ = ["fused_update_", "adamezo_update_"]
