"""Grouped perturbed embedding: ``out[g] = weight[ids] + scales[g] * U_g[ids]``.

An embedding table is large (V x D) but a batch reads only a few of its rows, so the
direction ``U_g`` is generated at the looked-up rows only: element ``(row, col)`` has
index ``row * D + col`` in the table's stream, whatever else the batch reads.

Each program gathers a ``[BLOCK_T, BLOCK_D]`` tile of rows once and writes it for every
group (a loop over groups inside the program), generating that group's direction tile
in registers.
"""

from collections.abc import Sequence

import torch

from zo_fx.streams.layout import check_kind, check_pid, key_tensors, sample_at

from . import native
from ._support import interpreting, key_words, tl, triton
from .dispatch import pick
from .tiles import KIND_CODE, alignment, direction_tile, load_key, round_to

_BLOCK_T = 32
_BLOCK_D = 64  # a multiple of 32, so the aligned direction path applies when D is one too


def grouped_embedding_reference(
    weight: torch.Tensor,
    ids: torch.Tensor,
    pid: int,
    seeds: Sequence[int],
    scales: Sequence[float],
    kind: str,
) -> torch.Tensor:
    """The specification of :func:`grouped_embedding`, with :func:`zo_fx.streams.sample_at`.

    Computed in float32 and rounded once to the table's dtype (float64 tables stay float64).
    """
    kind = check_kind(kind)
    _check(weight, ids, seeds, scales)
    d = weight.shape[1]
    out = _native(weight, ids, pid, seeds, scales, kind)
    if out is not None:
        return out
    rows = weight[ids]  # [*, D]
    index = ids.to(torch.int64).unsqueeze(-1) * d + torch.arange(d, device=ids.device)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    outs = []
    for seed, scale in zip(seeds, scales):
        u = sample_at(seed, pid, index, kind, dtype=acc)
        outs.append((rows.to(acc) + torch.tensor(scale, dtype=acc) * u).to(weight.dtype))
    return torch.stack(outs)


def _native(weight, ids, pid, seeds, scales, kind: str):
    """The reference's result from the native kernel (bit for bit), or None when it cannot take the call.

    Only ids inside ``[0, V)`` go native: anything else keeps the reference's own indexing and errors.
    """
    if not native.usable(weight) or ids.numel() == 0 or weight.shape[1] == 0:
        return None
    if int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]:
        return None
    distinct = sorted(set(int(s) for s in seeds))
    lo, hi, _, tag = key_tensors(distinct, pid, kind)
    which = torch.tensor([distinct.index(int(s)) for s in seeds], dtype=torch.int32)
    scales_t = torch.tensor([float(s) for s in scales], dtype=torch.float64)
    out = native.embedding(weight, ids, check_pid(pid), lo, hi, int(tag), which, scales_t, kind)
    return None if out is None else out.view(len(seeds), *ids.shape, weight.shape[1])


@triton.jit
def _grouped_embedding_kernel(
    w_ptr, ids_ptr, out_ptr, keys_ptr, scales_ptr, T, D, G, stride_wv, stride_wd, stride_og,
    KIND: tl.constexpr, ALIGNED: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    rows = tl.load(ids_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)
    w_ptrs = w_ptr + rows[:, None] * stride_wv + offs_d[None, :].to(tl.int64) * stride_wd
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
    for g in range(G):
        seed_lo, seed_hi, pid = load_key(keys_ptr, g)
        u = direction_tile(rows, offs_d, d0, D, seed_lo, seed_hi, pid, KIND, ALIGNED)
        out = round_to(w + tl.load(scales_ptr + g) * u, out_ptr.dtype.element_ty, INTERPRETED)
        tl.store(out_ptrs, out, mask=mask)
        out_ptrs += stride_og


def _grouped_embedding_triton(weight, ids, pid, seeds, scales, kind) -> torch.Tensor:
    V, D = weight.shape
    G = len(seeds)
    flat = ids.reshape(-1).contiguous()
    T = flat.numel()
    out = torch.empty(G, T, D, dtype=weight.dtype, device=weight.device)
    if T and D:
        # F.embedding's bounds check, without a host sync
        torch._assert_async(((flat >= 0) & (flat < V)).all(), "grouped_embedding: an id is outside [0, V)")
        dev = weight.device
        keys = key_words(seeds, pid, dev)
        scales_t = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=dev)
        grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(D, _BLOCK_D))
        _grouped_embedding_kernel[grid](
            weight, flat, out, keys, scales_t, T, D, G, weight.stride(0), weight.stride(1), out.stride(0),
            KIND=KIND_CODE[kind], ALIGNED=D % alignment(kind) == 0, INTERPRETED=interpreting(),
            BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D,
        )  # fmt: skip
    return out.view(G, *ids.shape, D)


def _check(weight, ids, seeds, scales) -> None:
    if weight.dim() != 2:
        raise ValueError(f"the embedding table must be [V, D]; got shape {tuple(weight.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an integer tensor (int64 or int32); got {ids.dtype}")
    if not seeds:
        raise ValueError("grouped_embedding needs at least one group (one seed and one scale)")
    if len(seeds) != len(scales):
        raise ValueError(f"{len(seeds)} seeds but {len(scales)} scales; give one (seed, scale) per group")


def grouped_embedding(
    weight: torch.Tensor,
    ids: torch.Tensor,
    pid: int,
    seeds: Sequence[int],
    scales: Sequence[float],
    kind: str,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``out[g] = weight[ids] + scales[g] * U_g[ids]`` with ``U_g`` made only at the rows read.

    Args:
        weight: the ``[V, D]`` table.
        ids: integer ids of any shape, each in ``[0, V)``.
        pid: the table's stream id.
        seeds, scales: one direction seed and one scale per group (scale 0: the plain lookup).
        kind: ``"rademacher"`` or ``"gaussian"``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"``; see :func:`zo_fx.kernels.dispatch.pick`.

    Returns:
        ``[G, *ids.shape, D]`` in the table's dtype.

    Example:
        >>> w = torch.zeros(10, 4)
        >>> grouped_embedding(w, torch.tensor([[1, 2]]), 3, [5], [1.0], "rademacher").abs().sum().item()
        8.0
    """
    kind = check_kind(kind)
    _check(weight, ids, seeds, scales)
    if pick(impl, weight) == "triton":
        return _grouped_embedding_triton(weight, ids, pid, seeds, scales, kind)
    return grouped_embedding_reference(weight, ids, pid, seeds, scales, kind)


__all__ = ["grouped_embedding", "grouped_embedding_reference"]
