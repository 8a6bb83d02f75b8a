"""Low-rank directions: a matrix parameter moves along ``A B^T / sqrt(r)``, never formed in a forward pass.

EGGROLL's and LOZO's structure in zo_fx's terms. For a matrix ``W [m, n]`` direction ``seed`` is
``u = A B^T / sqrt(r)`` with sign factors ``A [m, r]``, ``B [n, r]`` drawn from the Philox streams
(:func:`zo_fx.streams.layout.lowrank_factors`, layout in ``docs/directions.md``); each element has
unit variance, as a Rademacher element does. Parameters that are not matrices (biases, norms, conv
kernels) keep the Rademacher stream inside the same direction, so one seed still names one
direction of the whole model.

What this buys is the forward pass: ``x (W + s A B^T / sqrt(r))^T = x W^T + (s / sqrt(r)) (x B) A^T``,
so the shared GEMM runs once for every group's rows and each group adds two skinny GEMMs of inner
size ``r``. An embedding looks up ``A``'s rows at its ids; a head read at a few tokens uses those
rows of ``A`` alone. The update adds ``sum_i c_i A_i B_i^T / sqrt(r)`` tile by tile as one small GEMM
per tile, so no ``[m, n]`` direction ever exists beside the weights.

Every function here takes a parameter in its stored shape: that is what "matrix" means (a 2-D
parameter used through a reshape is perturbed densely in its stored shape by
:func:`perturbed_matrix`, then viewed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zo_fx.streams.layout import inv_sqrt_rank, lowrank_factors

from ._chunks import accumulation_dtype
from ._slab_cache import SlabCache

#: elements of one update tile (rows x columns): the scratch a low-rank update holds
TILE_NUMEL = 1 << 20
#: bytes of factor sets kept for reuse (one set per matrix and group table): every decoding step of a
#: ``generate`` call, and the forward and the update of a step, ask for the same factors
FACTOR_CACHE_BYTES = 256 << 20
_factor_cache = SlabCache(FACTOR_CACHE_BYTES)


def factors(seeds, pid: int, shape, rank: int, dtype, device, lazy: bool = False):
    """``lowrank_factors`` of these seeds, kept in a bounded cache (a pure function of its key).

    The cache packs the factors into a few large slabs (:mod:`._slab_cache` says why). The returned
    tensors are shared between callers: never write into them.
    """
    key = (tuple(int(s) for s in seeds), int(pid), tuple(shape), int(rank), dtype, str(device), bool(lazy))
    hit = _factor_cache.get(key)
    if hit is not None:
        return hit
    made = lowrank_factors(list(key[0]), pid, shape, rank, dtype=dtype, device=device, lazy=lazy)
    return _factor_cache.put(key, made)


def clear_factor_cache() -> None:
    """Drop every kept factor set (their slabs are freed once no caller holds a view of them)."""
    _factor_cache.clear()


def is_matrix(param: torch.Tensor) -> bool:
    """Whether ``param`` takes a low-rank direction (a 2-D parameter) rather than the Rademacher stream."""
    return param.dim() == 2


def perturbed_matrix(base: torch.Tensor, seed: int, pid: int, scale: float, rank: int,
                     lazy: bool = False) -> torch.Tensor:
    """``base + scale * A B^T / sqrt(r)`` as a new tensor, in the accumulation dtype, rounded once.

    The dense path, for the few uses that need a whole perturbed matrix (a weight used through a
    reshape, an adapter's factor multiplied with another parameter).
    """
    acc = accumulation_dtype(base.dtype)
    a, b = lowrank_factors([seed], pid, base.shape, rank, dtype=acc, device=base.device, lazy=lazy)
    u = (a[0] @ b[0].t()) * inv_sqrt_rank(rank)
    return (base.to(acc) + scale * u).to(base.dtype)


def _scaled_factors(weight: torch.Tensor, pid: int, seeds, scales, rank: int, dtype, layout: str, lazy: bool):
    """``(P [G, k, r] * scale_g / sqrt(r), Q [G, out, r])``: the input-side and output-side factors."""
    a, b = factors(seeds, pid, weight.shape, rank, dtype, weight.device, lazy)
    # out_in (nn.Linear): W [out, in] = A B^T, so x W^T = (x B) A^T; in_out (Conv1D, mm): x W = (x A) B^T
    p, q = (b, a) if layout == "out_in" else (a, b)
    s = torch.tensor(list(scales), dtype=torch.float64, device=weight.device).to(dtype) * inv_sqrt_rank(rank)
    return p * s.view(-1, 1, 1), q


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, seeds, scales, w_pid: int, rank: int, groups: int,
                   shared: bool, x_bdim: int, layout: str, lazy: bool = False) -> torch.Tensor:
    """``[G, rows, out]``: each group's ``x_g W_g^T`` (no bias): one shared GEMM plus two skinny GEMMs per group.

    ``shared``: ``x`` is every group's input (batch in dim 0); otherwise ``x`` holds the G groups'
    inputs, group-major along ``x_bdim``. The rows of each group are ``x_g`` flattened to ``[-1, k]``
    after moving the batch dim first.
    """
    k = x.shape[-1]
    if shared:
        rows = x.reshape(-1, k)
    else:
        rows = x.movedim(x_bdim, 0).reshape(groups, -1, k)
    base = F.linear(rows, weight) if layout == "out_in" else rows @ weight
    p, q = _scaled_factors(weight, w_pid, seeds, scales, rank, x.dtype, layout, lazy)
    if shared:
        t = (rows @ p.permute(1, 0, 2).reshape(k, -1)).view(rows.shape[0], groups, rank).transpose(0, 1)
        if groups == 1:  # one group: the base product is this group's, added to in place
            return _add_terms_(base.unsqueeze(0), t, q)
        return _plus_terms(base.unsqueeze(0), t, q)
    return _add_terms_(base, torch.bmm(rows, p), q)


# The groups' terms ``t_g q_g^T`` are accumulated into the base product by the GEMM itself (beta = 1):
# no output-sized temporary per term and no separate pass to add it. At rank 1 the term is an outer
# product, which the GEMM libraries run as a K = 1 GEMM at a tenth of an element-wise pass's speed
# (measured: 2.3 ms against 0.2 ms for 9 x 384 x 1536 on 2 EPYC threads): addcmul instead.


def _add_terms_(y: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``y[g] += t[g] @ q[g]^T`` in place (``y [G, R, N]``, ``t [G, R, r]``, ``q [G, N, r]``)."""
    return y.addcmul_(t, q.transpose(1, 2)) if t.shape[-1] == 1 else y.baddbmm_(t, q.transpose(1, 2))


def _plus_terms(base: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``base[0] + t[g] @ q[g]^T`` for every group, as a new ``[G, R, N]`` (``base [1, R, N]``, shared)."""
    if t.shape[-1] == 1:
        return torch.addcmul(base, t, q.transpose(1, 2))
    return torch.baddbmm(base.expand(t.shape[0], *base.shape[1:]), t, q.transpose(1, 2))


def embedding_rows(weight: torch.Tensor, ids: torch.Tensor, pid: int, seed: int, scale: float, rank: int,
                   padding_idx: int = -1, lazy: bool = False) -> torch.Tensor:
    """``W[ids] + scale * A[ids] B^T / sqrt(r)``: the direction made at the looked-up rows only."""
    rows = F.embedding(ids, weight, padding_idx)
    if scale == 0.0:
        return rows
    acc = accumulation_dtype(weight.dtype)
    a, b = factors([seed], pid, weight.shape, rank, acc, weight.device, lazy)
    u = F.embedding(ids, a[0]) @ b[0].t()
    return (rows.to(acc) + (scale * inv_sqrt_rank(rank)) * u).to(weight.dtype)


def readout_rows(weight: torch.Tensor, token_ids: torch.Tensor, layout: str, pid: int, seed: int,
                 rank: int, dtype, lazy: bool = False) -> torch.Tensor:
    """``[T, D]``: the direction of the head's weights for ``token_ids`` (rows of ``out_in``, columns of ``in_out``)."""
    a, b = factors([seed], pid, weight.shape, rank, dtype, weight.device, lazy)
    if layout == "out_in":  # W [V, D]: row t is A[t] B^T
        return (a[0][token_ids] @ b[0].t()) * inv_sqrt_rank(rank)
    return (b[0][token_ids] @ a[0].t()) * inv_sqrt_rank(rank)  # W [D, V]: column t is A B[t]^T


def _row_tiles(param: torch.Tensor):
    rows = max(1, TILE_NUMEL // max(1, param.shape[1]))
    for lo in range(0, param.shape[0], rows):
        yield slice(lo, min(lo + rows, param.shape[0]))


@torch.no_grad()
def update_(param: torch.Tensor, seeds, coefs, pid: int, rank: int, lr: float, weight_decay: float = 0.0,
            lazy: bool = False):
    """``param -= lr * (sum_i coefs[i] * A_i B_i^T / sqrt(r) + weight_decay * param)``, in place, tile by tile.

    Accumulated in float32 (float64 for float64 parameters) and rounded once, as the element-wise
    update is; each row tile's step is one GEMM ``(A_cat * c) B_cat^T`` over all directions.
    """
    acc = accumulation_dtype(param.dtype)
    dev = param.device
    n_dir = len(seeds)
    if n_dir:
        a, b = lowrank_factors(list(seeds), pid, param.shape, rank, dtype=acc, device=dev, lazy=lazy)
        c = torch.tensor([float(x) for x in coefs], dtype=torch.float64, device=dev).to(acc) * inv_sqrt_rank(rank)
        a_cat = (a * c.view(-1, 1, 1)).permute(1, 0, 2).reshape(param.shape[0], n_dir * rank)
        b_cat = b.permute(1, 0, 2).reshape(param.shape[1], n_dir * rank)
    lr_t, wd_t = torch.tensor(float(lr), dtype=acc), torch.tensor(float(weight_decay), dtype=acc)
    # ``p - lr * (step + wd * p)`` with the same roundings as written, in place on two tile buffers
    # reused across tiles: a fresh multi-MiB temporary per operation costs its page faults every time
    step_buf = wd_buf = None
    for rows in _row_tiles(param):
        target = param[rows]
        p = target.to(acc)
        if step_buf is None or step_buf.shape != p.shape:
            step_buf = torch.empty_like(p)
            wd_buf = torch.empty_like(p) if weight_decay != 0.0 else None
        if n_dir:
            step = torch.mm(a_cat[rows], b_cat.t(), out=step_buf)
        else:
            step = step_buf.zero_()
        if wd_buf is not None:
            step.add_(torch.mul(p, wd_t, out=wd_buf))
        step.mul_(lr_t)
        if param.dtype == acc:  # ``p`` is the parameter's own tile: in place
            target.sub_(step)
        else:
            target.copy_(torch.sub(p, step, out=step))
    return param


@torch.no_grad()
def adamezo_update_(param: torch.Tensor, seeds, coefs, pid: int, rank: int, lr: float, betas, weight_decay: float,
                    scale: float, adam_eps: float, lazy: bool = False):
    """The AdaMeZO step of :func:`zo_fx.kernels.adamezo_update_` on a matrix under low-rank directions.

    The truncated moments are rebuilt per row tile from each direction's ``A_j[rows] B_j^T / sqrt(r)``.
    """
    if not seeds:
        raise ValueError("the AdaMeZO update needs at least one (seed, coef) pair")
    acc = accumulation_dtype(param.dtype)
    a, b = lowrank_factors(list(seeds), pid, param.shape, rank, dtype=acc, device=param.device, lazy=lazy)
    inv = inv_sqrt_rank(rank)
    for rows in _row_tiles(param):
        p = param[rows].to(acc)
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        for j, c in enumerate(coefs):
            g = float(c) * ((a[j][rows] @ b[j].t()) * inv)
            m = m + betas[0] ** j * g
            v = v + betas[1] ** j * (g * g)
        step = scale * m / (torch.sqrt(v) + adam_eps)
        param[rows] = (p - lr * (step + weight_decay * p)).to(param.dtype)
    return param


__all__ = ["adamezo_update_", "clear_factor_cache", "embedding_rows", "grouped_linear", "is_matrix", "perturbed_matrix",
           "readout_rows", "update_"]
