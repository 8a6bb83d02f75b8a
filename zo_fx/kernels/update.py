"""In-place multi-direction updates: one read and one write of every parameter element.

* ``fused_update_``: ``param -= lr * (sum_i coefs[i] u_i + weight_decay * param)``, the
  MeZO / FZOO step.
* ``adamezo_update_``: the AdaMeZO step over the last K directions (most recent first),
  ``m = sum_j b1^j c_j u_j``, ``v = sum_j b2^j c_j^2 u_j^2``,
  ``param -= lr * (scale * m / (sqrt(v) + adam_eps) + weight_decay * param)``; the
  moments are rebuilt from the seeds each step, never stored (AdaMeZO's "cached Philox
  state").

Each has its torch reference first (``fused_update_reference_``,
``adamezo_update_reference_``: chunked, every direction regenerated per chunk, scratch
O(chunk) whatever the parameter size or K), then the Triton kernel, then the entry
point that picks between them.

The kernel gives each program ``BLOCK`` consecutive elements (a multiple of 128, so every
program starts on a Philox block of both streams), loads them once, regenerates every
direction on them in registers (``tiles.direction_tile``, the aligned path), and writes
them once. Accumulation is float32 for float32, bfloat16 and float16 parameters, and
the result is rounded once, exactly as the torch path does for them. float64 parameters
(which the torch path accumulates in float64) are not taken by the kernel:
:func:`zo_fx.kernels.dispatch.pick` sends them to the reference, since no GPU training
run keeps float64 weights and float64 Philox/Box-Muller would be needlessly slow.
"""

from collections.abc import Sequence

import torch

from zo_fx.streams.layout import (
    check_kind,
    element_kind,
    is_lazy,
    is_lowrank,
    key_tensors,
    per_block,
    rank_of,
)

from . import lowrank, native
from ._chunks import CHUNK, accumulation_dtype, check_chunk, chunk_starts, chunk_values, runner
from ._support import interpreting, key_words, tl, triton
from .dispatch import pick
from .tiles import KIND_CODE, direction_tile, load_key, round_to

# --------------------------------------------------------------------------- references


def _values(kind, n, skip, block0, seed_lo, seed_hi, pid, tag, dtype):
    """``n`` values starting ``skip`` elements into block ``block0`` (skip 0: the block-aligned chunk)."""
    if skip == 0:
        return chunk_values(kind, n, block0, seed_lo, seed_hi, pid, tag, dtype)
    return chunk_values(kind, skip + n, block0, seed_lo, seed_hi, pid, tag, dtype)[skip:]


def _update_chunk(param, coefs, lr, weight_decay, block0, seed_lo, seed_hi, pid, tag, kind: str, skip: int = 0):
    acc_dtype = accumulation_dtype(param.dtype)
    acc = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    for i in range(coefs.shape[0]):
        u = _values(kind, param.shape[0], skip, block0, seed_lo[i], seed_hi[i], pid, tag, acc_dtype)
        acc = acc + coefs[i].to(acc_dtype) * u
    p = param.to(acc_dtype)
    return (p - lr.to(acc_dtype) * (acc + weight_decay.to(acc_dtype) * p)).to(param.dtype)


def _adamezo_chunk(param, coefs, lr, weight_decay, beta1_pows, beta2_pows, scale, adam_eps,
                   block0, seed_lo, seed_hi, pid, tag, kind: str, skip: int = 0):
    """Truncated Adam moments of the last K directions, rebuilt for this chunk only."""
    acc_dtype = accumulation_dtype(param.dtype)
    m = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    v = torch.zeros(param.shape, dtype=acc_dtype, device=param.device)
    for j in range(coefs.shape[0]):
        u = _values(kind, param.shape[0], skip, block0, seed_lo[j], seed_hi[j], pid, tag, acc_dtype)
        g = coefs[j].to(acc_dtype) * u
        m = m + beta1_pows[j].to(acc_dtype) * g
        v = v + beta2_pows[j].to(acc_dtype) * (g * g)
    step = scale.to(acc_dtype) * m / (torch.sqrt(v) + adam_eps.to(acc_dtype))
    p = param.to(acc_dtype)
    return (p - lr.to(acc_dtype) * (step + weight_decay.to(acc_dtype) * p)).to(param.dtype)


def _f64(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def shard_chunks(start: int, count: int, total: int, chunk: int, kind: str):
    """(local start, length, global chunk length, first block, skip) of the pieces of a shard.

    The shard holds elements ``[start, start + count)`` of a parameter of ``total``
    elements. It is cut on the unsharded update's chunk grid (global multiples of
    ``chunk``), so every element is computed by the same function (eager or compiled,
    chosen by the global chunk's length) as in the unsharded update: that is what makes
    the sharded update equal the unsharded one bit for bit. A piece that does not start on
    a Philox block generates from its containing block and drops the first ``skip`` values.
    """
    if start < 0 or count < 0 or start + count > total:
        raise ValueError(f"the shard [{start}, {start + count}) is not inside a parameter of {total} elements")
    n_block = per_block(kind)
    first = (start // chunk) * chunk
    for cs, cn in chunk_starts(total - first, chunk):
        cs += first
        lo, hi = max(cs, start), min(cs + cn, start + count)
        if lo >= hi:
            if cs >= start + count:
                break
            continue
        yield lo - start, hi - lo, cn, lo // n_block, lo % n_block


def _shard_args(param, start, total):
    start = int(start)
    total = start + param.numel() if total is None else int(total)
    return start, total


@torch.no_grad()
def fused_update_reference_(param, seeds, coefs, pid, kind, lr, weight_decay=0.0, *, chunk: int = CHUNK,
                            start: int = 0, total: int | None = None):
    """The specification of :func:`fused_update_`, in torch ops (arguments as there).

    One read and one write of every element; directions regenerated chunk by chunk, so
    scratch memory is O(chunk), never O(parameter * directions). ``param`` may be a shard:
    the flat elements ``[start, start + param.numel())`` of a parameter of ``total``
    elements (default: ``start + param.numel()``); see :func:`shard_chunks`.
    """
    kind = check_kind(kind)
    check_chunk(chunk)
    _check(param, seeds, coefs)
    start, total = _shard_args(param, start, total)
    if len(seeds) == 0 and weight_decay == 0.0:
        return param
    flat, dev = param.view(-1), param.device
    lo, hi, pid_t, tag = key_tensors(seeds, pid, kind, dev)
    coefs_t, lr_t, wd_t = _f64([float(c) for c in coefs], dev), _f64(float(lr), dev), _f64(float(weight_decay), dev)
    # the native kernel when it can take the parameter: Rademacher bit for bit the torch chunk,
    # Gaussian within a few float32 ulps (the values the native forward tiles use too)
    use_native = native.usable(param)
    for s, n, cn, b0, skip in shard_chunks(start, flat.numel(), total, chunk, kind):
        view = flat[s : s + n]
        # the native kernel: the same operations per element, in place
        if use_native and native.update_(view, coefs_t, lr, weight_decay, b0, skip, lo, hi, pid_t, tag, kind):
            continue
        block0 = torch.tensor(b0, dtype=torch.int64, device=dev)
        args = (view, coefs_t, lr_t, wd_t, block0, lo, hi, pid_t, tag, kind) + ((skip,) if skip else ())
        view.copy_(runner(_update_chunk, cn)(*args))
    return param


@torch.no_grad()
def adamezo_update_reference_(param, seeds, coefs, pid, kind, lr, betas=(0.7, 0.9), weight_decay=0.0,
                              scale=100.0, adam_eps=1e-5, *, chunk: int = CHUNK, start: int = 0,
                              total: int | None = None):
    """The specification of :func:`adamezo_update_`, in torch ops (arguments as there).

    The moments exist only for the chunk being updated: a few chunk-sized buffers of
    scratch, whatever the parameter size or K. ``start`` and ``total`` as in
    :func:`fused_update_reference_` (a shard of a parameter).
    """
    kind = check_kind(kind)
    check_chunk(chunk)
    _check(param, seeds, coefs)
    start, total = _shard_args(param, start, total)
    if not seeds:
        raise ValueError("the AdaMeZO update needs at least one (seed, coef) pair")
    flat, dev = param.view(-1), param.device
    lo, hi, pid_t, tag = key_tensors(seeds, pid, kind, dev)
    coefs_t = _f64([float(c) for c in coefs], dev)
    b1 = _f64([betas[0] ** j for j in range(len(seeds))], dev)
    b2 = _f64([betas[1] ** j for j in range(len(seeds))], dev)
    consts = [_f64(float(v), dev) for v in (lr, weight_decay)]
    scale_t, eps_t = _f64(float(scale), dev), _f64(float(adam_eps), dev)
    for s, n, cn, b0, skip in shard_chunks(start, flat.numel(), total, chunk, kind):
        view = flat[s : s + n]
        block0 = torch.tensor(b0, dtype=torch.int64, device=dev)
        extra = (skip,) if skip else ()
        run = runner(_adamezo_chunk, cn)
        view.copy_(run(view, coefs_t, *consts, b1, b2, scale_t, eps_t, block0, lo, hi, pid_t, tag, kind, *extra))
    return param


# --------------------------------------------------------------------------- kernel


#: elements per program; a multiple of 128 (one Rademacher block). The update is
#: memory-bound for a few directions, so a moderate block with 4 warps suffices.
_BLOCK = 1024


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


# --------------------------------------------------------------------------- entry points


def _check(param: torch.Tensor, seeds, coefs) -> None:
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefficients")
    if not param.is_contiguous():
        raise ValueError(
            "the fused updates need a contiguous parameter (its storage order is the element order)"
        )


def _lowrank_or_element(param: torch.Tensor, kind: str, start: int, total: int | None) -> str:
    """A low-rank kind for a whole matrix; the element kind for any other parameter; an error for a shard."""
    if start != 0 or (total is not None and total != param.numel()):
        raise ValueError("low-rank directions update whole parameters: a shard (start/total) cannot tell a matrix's "
                         "rows from its columns. Update the whole parameter, or use kind='rademacher'")
    return kind if lowrank.is_matrix(param) else element_kind(kind)


def _shard_pick(impl: str, param: torch.Tensor, start: int, total: int | None) -> str:
    """:func:`pick`, except that a shard (an element offset or a larger whole) needs the torch reference."""
    sharded = start != 0 or (total is not None and total != param.numel())
    if not sharded:
        return pick(impl, param)
    if impl == "triton":
        raise ValueError("a sharded update (start/total given) runs on the torch reference only: pass impl='torch' "
                         "or 'auto'; the Triton update kernel always starts at element 0")
    return "torch"


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
    start: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """``param -= lr * (sum_i coefs[i] * u(seeds[i], pid) + weight_decay * param)``, in place.

    Args:
        param: the contiguous parameter (updated in place and returned).
        seeds, coefs: one coefficient per direction seed.
        pid: the parameter's stream id.
        kind: ``"rademacher"`` or ``"gaussian"``.
        lr, weight_decay: as in the formula.
        impl: ``"auto"``, ``"torch"`` (:func:`fused_update_reference_`) or ``"triton"``;
            see :func:`zo_fx.kernels.dispatch.pick`.
        start, total: ``param`` is a shard, the flat elements ``[start, start + param.numel())``
            of a parameter of ``total`` elements (default ``start + param.numel()``); its elements
            come out bit-identical to the same elements of the unsharded update. Shards run on the
            torch reference only (the Triton kernel starts every parameter at element 0).

    Example:
        >>> p = torch.zeros(4)
        >>> fused_update_(p, [7], [2.0], 1, "rademacher", lr=0.5).abs().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    _check(param, seeds, coefs)
    if is_lowrank(kind):
        kind = _lowrank_or_element(param, kind, start, total)
        if is_lowrank(kind):
            return lowrank.update_(param, seeds, coefs, pid, rank_of(kind), lr, weight_decay, is_lazy(kind))
    kind = check_kind(kind)
    if _shard_pick(impl, param, start, total) == "torch":
        return fused_update_reference_(param, seeds, coefs, pid, kind, lr, weight_decay, start=start, total=total)
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
    start: int = 0,
    total: int | None = None,
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
        impl: ``"auto"``, ``"torch"`` (:func:`adamezo_update_reference_`) or ``"triton"``.
        start, total: a shard of the parameter, as in :func:`fused_update_`.
    """
    _check(param, seeds, coefs)
    if len(betas) != 2:
        raise ValueError(f"betas must be (b1, b2); got {betas!r}")
    if is_lowrank(kind):
        kind = _lowrank_or_element(param, kind, start, total)
        if is_lowrank(kind):
            return lowrank.adamezo_update_(param, seeds, coefs, pid, rank_of(kind), lr, betas, weight_decay, scale,
                                           adam_eps, is_lazy(kind))
    kind = check_kind(kind)
    if _shard_pick(impl, param, start, total) == "torch":
        return adamezo_update_reference_(param, seeds, coefs, pid, kind, lr, betas, weight_decay, scale, adam_eps,
                                         start=start, total=total)
    if param.numel():
        _launch(param, seeds, coefs, pid, kind, lr, weight_decay, betas, scale, adam_eps)
    return param


__all__ = [
    "adamezo_update_", "adamezo_update_reference_", "fused_update_", "fused_update_reference_", "shard_chunks",
]
