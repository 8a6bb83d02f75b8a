"""Perturbed copies of a parameter: ``base + scale * u(seed, pid)``, never written in place.

The per-group weight a torch-path op uses when it cannot avoid forming one (the Triton
kernels form it in registers instead). ``base`` is never written; values are computed
in float32 (float64 for float64 parameters) and rounded once to ``base``'s dtype.
"""

from __future__ import annotations

import torch

from zo_fx.streams.layout import (
    check_kind,
    element_kind,
    is_lazy,
    is_lowrank,
    key_tensors,
    per_block,
    rank_of,
    sample,
)

from ._chunks import CHUNK, accumulation_dtype, batched_values, chunk_starts, chunk_values, runner
from .lowrank import is_matrix, perturbed_matrix
from .scaling import applies, factor_for

#: parameters up to this size get all their per-group copies from one batched generator call
SMALL_NUMEL = 1 << 16


def _perturbed_chunk(base, scale, block0, seed_lo, seed_hi, pid, tag, kind: str):
    acc = accumulation_dtype(base.dtype)
    u = chunk_values(kind, base.shape[0], block0, seed_lo, seed_hi, pid, tag, acc)
    return (base.to(acc) + scale.to(acc) * u).to(base.dtype)


def perturbed(base: torch.Tensor, seed: int, pid: int, scale: float, kind: str, *, start: int = 0) -> torch.Tensor:
    """``base + scale * u(seed, pid)`` as a new tensor shaped like ``base``.

    Under a low-rank kind ``base`` must be the parameter in its stored shape: a matrix takes
    ``A B^T / sqrt(r)``, anything else the Rademacher stream.

    ``start`` is the flat index of ``base``'s first element inside its parameter; it must
    be a multiple of 128 (use :func:`zo_fx.streams.sample` for other offsets).
    """
    if is_lowrank(kind):
        if is_matrix(base):
            if start:
                raise ValueError("a low-rank direction is defined on the whole matrix; perturbed() got a piece of "
                                 f"one (start={start})")
            return perturbed_matrix(base, seed, pid, scale, rank_of(kind), is_lazy(kind))
        kind = element_kind(kind)
    kind = check_kind(kind)
    factor = factor_for(pid, accumulation_dtype(base.dtype))
    if factor is not None:
        return _scaled(base, seed, pid, scale, kind, start, factor)
    if start % 128:
        raise ValueError(f"perturbed() needs a block-aligned start (multiple of 128); got {start}")
    flat = base.reshape(-1)
    lo, hi, pid_t, tag = key_tensors([seed], pid, kind, base.device)
    scale_t = torch.tensor(scale, dtype=torch.float64, device=base.device)
    pb = per_block(kind)

    def piece(s: int, n: int) -> torch.Tensor:
        block0 = torch.tensor((start + s) // pb, dtype=torch.int64, device=base.device)
        return runner(_perturbed_chunk, n)(flat[s : s + n], scale_t, block0, lo[0], hi[0], pid_t, tag, kind)

    if flat.numel() <= CHUNK:  # one piece: the function's output is the result, no extra copy
        return piece(0, flat.numel()).view(base.shape)
    out = torch.empty_like(flat)
    for s, n in chunk_starts(flat.numel(), CHUNK):
        out[s : s + n] = piece(s, n)
    return out.view(base.shape)


def _scaled(base, seed, pid, scale, kind, start, factor):
    """``base + scale * (factor * u)`` with a per-element factor (:mod:`zo_fx.kernels.scaling`), whole."""
    n = base.numel()
    u = sample(seed, pid, start, n, kind, dtype=factor.dtype)
    u = factor.reshape(-1)[start : start + n] * u
    return (base.reshape(-1).to(factor.dtype) + scale * u).to(base.dtype).view(base.shape)


def perturbed_or_base(base: torch.Tensor | None, seed: int, pid: int | None, scale: float, kind: str):
    """:func:`perturbed`, or ``base`` itself when there is nothing to perturb (no tensor, a frozen
    tensor: ``pid`` None, or a zero scale)."""
    if base is None or pid is None or scale == 0.0:
        return base
    return perturbed(base, seed, pid, scale, kind)


def perturbed_groups(base: torch.Tensor, seeds, pid: int, scales, kind: str) -> list[torch.Tensor]:
    """``[base + scales[g] * u(seeds[g], pid) for g]``: the per-group copies of a parameter.

    Small parameters (norm weights, biases) are generated for all groups in one call:
    the Philox cost of a tiny tensor is its op count, not its size, so one batched call
    replaces G. Values are the same as G calls of :func:`perturbed`. A scale of 0 gives
    ``base`` itself.
    """
    if is_lowrank(kind) and not is_matrix(base):
        kind = element_kind(kind)
    if is_lowrank(kind) or base.numel() > SMALL_NUMEL or base.numel() == 0 or applies(pid):
        return [base if s == 0.0 else perturbed(base, seed, pid, s, kind) for seed, s in zip(seeds, scales)]
    lo, hi, pid_t, tag = key_tensors(seeds, pid, kind, base.device)
    acc = accumulation_dtype(base.dtype)
    u = batched_values(kind, base.numel(), lo, hi, pid_t, tag, acc)  # [G, n]
    flat = base.reshape(-1).to(acc)
    scale_t = torch.tensor(list(scales), dtype=torch.float64, device=base.device).to(acc).unsqueeze(1)
    out = (flat + scale_t * u).to(base.dtype)
    return [base if s == 0.0 else out[g].view(base.shape) for g, s in enumerate(scales)]


__all__ = ["SMALL_NUMEL", "perturbed", "perturbed_groups", "perturbed_or_base"]
