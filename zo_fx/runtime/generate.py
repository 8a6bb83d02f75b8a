"""Generate-and-apply passes over whole parameters: the hot loops of every step.

Two operations touch every perturbed weight element:

* ``perturbed(base, seed, pid, scale, kind)``: ``base + scale * u`` as a new tensor
  (the per-group weight the forward uses; ``base`` is never written).
* ``apply_update_(param, seeds, coefs, pid, kind, lr, weight_decay)``:
  ``param -= lr * (sum_i coefs[i] * u_i + weight_decay * param)`` in one read and one
  write of each element, every direction regenerated from its seed, accumulated in
  float32 (float64 for float64 parameters) and rounded once.

Both walk the parameter in chunks whose starts are multiples of 128 elements, so every
chunk begins on a Philox block boundary of both streams. Large chunks go through a
``torch.compile``d kernel (the Philox words are cheap, the sign expansion is fused into
the add); small tensors stay eager so that tiny test models never pay compile time.
Eager and compiled paths produce the same directions bit for bit; they may round the
final add differently, so the choice depends only on the chunk size (deterministic).
Set ``ZO_FX_COMPILE=0`` to force eager everywhere.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from .directions import RADEMACHER, STREAM_TAG, TWO_PI_F32, INV_2_24, check_kind, check_seed
from .philox import MASK32, philox_words

#: chunk length of the generate-and-apply passes; a multiple of 128 (one Rademacher block)
CHUNK = 1 << 22
#: chunks with at least this many elements use the compiled kernel
COMPILE_MIN_NUMEL = 1 << 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters accumulate in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compile_enabled() -> bool:
    return os.environ.get("ZO_FX_COMPILE", "1") != "0"


def _key_tensors(seeds, pid: int, kind: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seeds = [check_seed(s) for s in seeds]
    lo = torch.tensor([s & MASK32 for s in seeds], dtype=torch.int64, device=device)
    hi = torch.tensor([(s >> 32) & MASK32 for s in seeds], dtype=torch.int64, device=device)
    pid_t = torch.tensor(int(pid) & MASK32, dtype=torch.int64, device=device)
    tag = torch.tensor(STREAM_TAG[kind], dtype=torch.int64, device=device)
    return lo, hi, pid_t, tag


def _chunk_values(kind: str, n: int, block0, seed_lo, seed_hi, pid, tag, dtype) -> torch.Tensor:
    """``n`` values of one stream from a block-aligned start.

    ``block0`` is the index of the first block of this chunk *in units of the kind's
    block* (128 elements for Rademacher, 4 for Gaussian). Written with tensor-valued
    key words so that one compiled graph serves every seed and parameter.
    """
    nb = (n + _per_block(kind) - 1) // _per_block(kind)
    blocks = block0 + torch.arange(nb, dtype=torch.int64, device=seed_lo.device)
    return _block_values(kind, blocks, seed_lo, seed_hi, pid, tag).reshape(-1)[:n].to(dtype)


def _block_values(kind: str, blocks, seed_lo, seed_hi, pid, tag) -> torch.Tensor:
    """Stream values of whole blocks: shape [*seed dims, n_blocks, 128 or 4], float32 or int."""
    w = torch.broadcast_tensors(*philox_words(blocks & MASK32, blocks >> 32, seed_hi, tag, seed_lo, pid))
    if kind == RADEMACHER:
        words = torch.stack(w, -1).to(torch.int32)  # [..., nb, 4]
        shifts = torch.arange(32, dtype=torch.int32, device=blocks.device)
        bits = (words.unsqueeze(-1) >> shifts) & 1  # word-major, LSB first
        return (1 - 2 * bits).flatten(-2)
    values = []
    for even, odd in ((w[0], w[1]), (w[2], w[3])):
        u1 = ((even >> 8) + 1).to(torch.float32) * INV_2_24
        u2 = (odd >> 8).to(torch.float32) * INV_2_24
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = u2 * TWO_PI_F32
        values += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(values, -1)


def _perturbed_chunk(base, scale, block0, seed_lo, seed_hi, pid, tag, kind: str):
    acc = accumulation_dtype(base.dtype)
    u = _chunk_values(kind, base.shape[0], block0, seed_lo, seed_hi, pid, tag, acc)
    return (base.to(acc) + scale.to(acc) * u).to(base.dtype)


def _update_chunk(param, coefs, lr, weight_decay, block0, seed_lo, seed_hi, pid, tag, kind: str):
    acc_dtype = accumulation_dtype(param.dtype)
    acc = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    for i in range(coefs.shape[0]):
        u = _chunk_values(kind, param.shape[0], block0, seed_lo[i], seed_hi[i], pid, tag, acc_dtype)
        acc = acc + coefs[i].to(acc_dtype) * u
    p = param.to(acc_dtype)
    return (p - lr.to(acc_dtype) * (acc + weight_decay.to(acc_dtype) * p)).to(param.dtype)


def _adamezo_chunk(param, coefs, lr, weight_decay, beta1_pows, beta2_pows, scale, adam_eps,
                   block0, seed_lo, seed_hi, pid, tag, kind: str):
    """Truncated Adam moments of the last K directions, rebuilt for this chunk only."""
    acc_dtype = accumulation_dtype(param.dtype)
    m = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    v = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    for j in range(coefs.shape[0]):
        u = _chunk_values(kind, param.shape[0], block0, seed_lo[j], seed_hi[j], pid, tag, acc_dtype)
        g = coefs[j].to(acc_dtype) * u
        m = m + beta1_pows[j].to(acc_dtype) * g
        v = v + beta2_pows[j].to(acc_dtype) * (g * g)
    step = scale.to(acc_dtype) * m / (torch.sqrt(v) + adam_eps.to(acc_dtype))
    p = param.to(acc_dtype)
    return (p - lr.to(acc_dtype) * (step + weight_decay.to(acc_dtype) * p)).to(param.dtype)


_KERNELS = {"perturbed": _perturbed_chunk, "update": _update_chunk, "adamezo": _adamezo_chunk}


@lru_cache(maxsize=None)
def _compiled(fn_name: str):
    return torch.compile(_KERNELS[fn_name], dynamic=True)


def _runner(fn_name: str, numel: int):
    if numel >= COMPILE_MIN_NUMEL and _compile_enabled():
        return _compiled(fn_name)
    return _KERNELS[fn_name]


def _per_block(kind: str) -> int:
    return 128 if kind == RADEMACHER else 4


def perturbed(base: torch.Tensor, seed: int, pid: int, scale: float, kind: str, *, start: int = 0) -> torch.Tensor:
    """``base + scale * u(seed, pid)`` as a new tensor shaped like ``base``.

    ``start`` is the flat index of ``base``'s first element inside its parameter; it must
    be a multiple of 128 (use :func:`zo_fx.runtime.directions.sample` for other offsets).
    """
    kind = check_kind(kind)
    if start % 128:
        raise ValueError(f"perturbed() needs a block-aligned start (multiple of 128); got {start}")
    flat = base.reshape(-1)
    lo, hi, pid_t, tag = _key_tensors([seed], pid, kind, base.device)
    scale_t = torch.tensor(scale, dtype=torch.float64, device=base.device)
    pb = _per_block(kind)

    def piece(s: int, n: int) -> torch.Tensor:
        block0 = torch.tensor((start + s) // pb, dtype=torch.int64, device=base.device)
        return _runner("perturbed", n)(flat[s : s + n], scale_t, block0, lo[0], hi[0], pid_t, tag, kind)

    if flat.numel() <= CHUNK:  # one piece: the kernel's output is the result, no extra copy
        return piece(0, flat.numel()).view(base.shape)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - s)
        out[s : s + n] = piece(s, n)
    return out.view(base.shape)


#: parameters up to this size get all their per-group copies from one batched generator call
SMALL_NUMEL = 1 << 16


def perturbed_groups(base: torch.Tensor, seeds, pid: int, scales, kind: str) -> list[torch.Tensor]:
    """``[base + scales[g] * u(seeds[g], pid) for g]``: the per-group copies of a parameter.

    Small parameters (norm weights, biases) are generated for all groups in one call:
    the Philox cost of a tiny tensor is its op count, not its size, so one batched call
    replaces G. Values are the same as G calls of :func:`perturbed`.
    """
    kind = check_kind(kind)
    if base.numel() > SMALL_NUMEL or base.numel() == 0:
        return [base if s == 0.0 else perturbed(base, seed, pid, s, kind) for seed, s in zip(seeds, scales)]
    lo, hi, pid_t, tag = _key_tensors(seeds, pid, kind, base.device)
    n = base.numel()
    pb = _per_block(kind)
    blocks = torch.arange((n + pb - 1) // pb, dtype=torch.int64, device=base.device)
    acc = accumulation_dtype(base.dtype)
    u = _batched_values(kind, n, blocks, lo.unsqueeze(1), hi.unsqueeze(1), pid_t, tag, acc)  # [G, n]
    flat = base.reshape(-1).to(acc)
    scale_t = torch.tensor(list(scales), dtype=torch.float64, device=base.device).to(acc).unsqueeze(1)
    out = (flat + scale_t * u).to(base.dtype)
    return [base if s == 0.0 else out[g].view(base.shape) for g, s in enumerate(scales)]


def _batched_values(kind, n, blocks, seed_lo, seed_hi, pid, tag, dtype) -> torch.Tensor:
    """[G, n] stream values for G seeds (seed words shaped [G, 1]) at the same blocks."""
    values = _block_values(kind, blocks, seed_lo, seed_hi, pid, tag)
    return values.reshape(values.shape[0], -1)[:, :n].to(dtype)


@torch.no_grad()
def apply_update_(
    param: torch.Tensor,
    seeds,
    coefs,
    pid: int,
    kind: str,
    lr: float,
    weight_decay: float = 0.0,
    *,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``param -= lr * (sum_i coefs[i] * u(seeds[i]) + weight_decay * param)``, in place, fused.

    One read and one write of every element; directions regenerated chunk by chunk, so
    scratch memory is O(chunk), never O(parameter * directions).
    """
    kind = check_kind(kind)
    if chunk % 128:
        raise ValueError(f"update chunk must be a multiple of 128 elements; got {chunk}")
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefficients")
    if not param.is_contiguous():
        raise ValueError("apply_update_ needs a contiguous parameter")
    if len(seeds) == 0 and weight_decay == 0.0:
        return param
    flat = param.view(-1)
    dev = param.device
    lo, hi, pid_t, tag = _key_tensors(seeds, pid, kind, dev)
    coefs_t = torch.tensor([float(c) for c in coefs], dtype=torch.float64, device=dev)
    lr_t = torch.tensor(float(lr), dtype=torch.float64, device=dev)
    wd_t = torch.tensor(float(weight_decay), dtype=torch.float64, device=dev)
    pb = _per_block(kind)
    for s in range(0, flat.numel(), chunk):
        view = flat[s : s + chunk]
        block0 = torch.tensor(s // pb, dtype=torch.int64, device=dev)
        run = _runner("update", view.numel())
        new = run(view, coefs_t, lr_t, wd_t, block0, lo, hi, pid_t, tag, kind)
        view.copy_(new)
    return param


@torch.no_grad()
def apply_adamezo_update_(
    param: torch.Tensor,
    seeds,
    coefs,
    pid: int,
    kind: str,
    lr: float,
    betas: tuple[float, float] = (0.7, 0.9),
    weight_decay: float = 0.0,
    scale: float = 100.0,
    adam_eps: float = 1e-5,
    *,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """AdaMeZO's update from the last K (seed, coef) pairs, MOST RECENT FIRST, in place.

    Per element: ``m = sum_j b1**j * c_j * u_j``, ``v = sum_j b2**j * (c_j * u_j)**2``,
    ``param -= lr * (scale * m / (sqrt(v) + adam_eps) + weight_decay * param)``.
    The moments exist only for the chunk being updated: scratch memory is
    O(chunk) (a few chunk-sized buffers), whatever the parameter size or K.
    """
    kind = check_kind(kind)
    if chunk % 128:
        raise ValueError(f"update chunk must be a multiple of 128 elements; got {chunk}")
    if len(seeds) != len(coefs) or not seeds:
        raise ValueError(f"need as many seeds as coefficients (>= 1); got {len(seeds)} and {len(coefs)}")
    flat = param.view(-1)
    dev = param.device
    lo, hi, pid_t, tag = _key_tensors(seeds, pid, kind, dev)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64, device=dev)  # noqa: E731
    coefs_t = f64([float(c) for c in coefs])
    b1 = f64([betas[0] ** j for j in range(len(seeds))])
    b2 = f64([betas[1] ** j for j in range(len(seeds))])
    pb = _per_block(kind)
    for s in range(0, flat.numel(), chunk):
        view = flat[s : s + chunk]
        block0 = torch.tensor(s // pb, dtype=torch.int64, device=dev)
        run = _runner("adamezo", view.numel())
        view.copy_(run(view, coefs_t, f64(float(lr)), f64(float(weight_decay)), b1, b2, f64(float(scale)),
                       f64(float(adam_eps)), block0, lo, hi, pid_t, tag, kind))
    return param


__all__ = ["perturbed", "apply_update_", "apply_adamezo_update_", "accumulation_dtype", "CHUNK"]
