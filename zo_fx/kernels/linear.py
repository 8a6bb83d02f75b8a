"""Grouped perturbed linear: G GEMMs ``x_g @ (W + s_g U_g)^T + (b + s_g v_g)`` from one weight read.

A ZOModule evaluates G groups (MeZO: +eps and -eps; FZOO: the unperturbed weights and N
directions) in one batch. Materialising ``W + s_g U_g`` per group costs G weight-sized
writes and reads per step; this kernel instead loads each W tile once and forms every
group's perturbed tile in registers, with ``U_g`` regenerated from its seed
(:mod:`zo_fx.kernels.philox`).

How groups are tiled
--------------------
The grid is (M tiles, N tiles, group chunks). One program owns ``GROUP_TILE`` (at most
4) consecutive groups: at each K step it loads the W tile once, then for each of its
groups forms ``(W + s_g U_g)`` in float32, rounds it to the input dtype (the rounding
:func:`zo_fx.runtime.generate.perturbed` does), and accumulates ``x_g @ .`` in its own
float32 accumulator. With G <= 4 every W tile is read exactly once for all groups; a
larger G is split into balanced chunks (G = 6 -> 2 x 3), each reading W once.
Accumulators live in registers, so the autotuner drops tile shapes where
``GROUP_TILE`` of them would spill (see ``_prune``).

When W is frozen and the input is shared by all groups (the frozen prefix of a
partially trained model), the groups differ only in their bias: the product is
computed once and each group adds its own bias (up to 8 groups per program).

Element order: ``U_g`` is the direction of ``(seed_g, w_pid)`` shaped like W as stored,
so element ``(n, k)`` of an ``[N, K]`` weight (``nn.Linear``) has index ``n*K + k`` and
element ``(k, n)`` of a ``[K, N]`` weight (GPT-2 ``Conv1D``, ``addmm``) has ``k*N + n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zo_fx.runtime.directions import check_kind
from zo_fx.runtime.generate import perturbed

from . import pick
from ._support import interpreting, key_words, tl, triton
from .philox import KIND_CODE, alignment, direction_at, direction_tile, load_key

#: most accumulators one program keeps (unrolled below as acc0..acc3)
MAX_GROUP_TILE = 4
#: groups per program when they share one product (frozen W, shared input): no accumulator each
MAX_SHARED_GROUP_TILE = 8
#: accumulator registers per thread the autotuner allows (255 is the hardware limit; the
#: operand tiles and the direction generation need the rest)
_MAX_ACC_REGISTERS = 128


# --------------------------------------------------------------------------- reference


def grouped_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_pid: int | None,
    b_pid: int | None,
    seeds: Sequence[int],
    scales: Sequence[float],
    kind: str,
    *,
    shared_input: bool,
    transposed_weight: bool = False,
) -> torch.Tensor:
    """The specification of :func:`grouped_linear`: loop over groups, materialise each perturbed weight.

    Holds one perturbed weight at a time (``W + s_g U_g`` via
    :func:`zo_fx.runtime.generate.perturbed`, i.e. computed in float32, rounded once to
    the weight's dtype). Arguments as in :func:`grouped_linear`.
    """
    kind = check_kind(kind)
    _check_groups(x, seeds, scales, shared_input)
    outs = []
    for g, (seed, scale) in enumerate(zip(seeds, scales)):
        w = weight if w_pid is None else perturbed(weight, seed, w_pid, scale, kind)
        b = bias if bias is None or b_pid is None else perturbed(bias, seed, b_pid, scale, kind)
        xg = x if shared_input else x[g]
        if not transposed_weight:
            outs.append(F.linear(xg, w, b))
        elif b is None:
            outs.append(xg @ w)
        else:  # GPT-2 Conv1D: addmm(b, x, W)
            outs.append(torch.addmm(b, xg.reshape(-1, xg.shape[-1]), w).view(*xg.shape[:-1], w.shape[1]))
        del w, b  # at most one perturbed weight alive
    return torch.stack(outs)


# --------------------------------------------------------------------------- kernel


def _configs():
    if interpreting():  # one small tile: the interpreter runs programs one by one in Python
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # Hopper bf16 GEMM shapes (the usual 64-128 tiles, 3-4 stages); BLOCK_K and BLOCK_N
    # stay multiples of 32 so the aligned direction path (philox.direction_tile) applies.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 128, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tile shapes whose ``N_ACC`` float32 accumulators would not fit in registers."""
    n_acc = {**named_args, **kwargs}["N_ACC"]
    fits = [
        c
        for c in configs
        if n_acc * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _MAX_ACC_REGISTERS * 32 * c.num_warps
    ]
    return fits or configs[-1:]


@triton.jit
def _accumulate(
    acc, w, x_shared, x_ptr, g, offs_m, offs_k, offs_n, k0, n0, M, N, K,
    stride_xg, stride_xm, stride_xk, keys_ptr, scales_ptr,
    KIND: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, PERTURB_W: tl.constexpr,
    SHARED: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``acc + x_g @ (W + s_g U_g)`` for one [BLOCK_K, BLOCK_N] tile ``w`` of W^T (float32 if perturbed)."""
    if SHARED:
        xt = x_shared
    else:
        x_ptrs = x_ptr + g.to(tl.int64) * stride_xg + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        xt = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
    if PERTURB_W:
        scale = tl.load(scales_ptr + g)
        seed_lo, seed_hi, pid = load_key(keys_ptr, g)
        if TRANSPOSED:  # W is [K, N]: rows k, element k*N + n
            u = direction_tile(offs_k, offs_n, n0, N, seed_lo, seed_hi, pid, KIND, ALIGNED)
        else:  # W is [N, K]: rows n, element n*K + k, generated [BLOCK_N, BLOCK_K] then transposed
            u = tl.trans(direction_tile(offs_n, offs_k, k0, K, seed_lo, seed_hi, pid, KIND, ALIGNED))
        wt = (w + scale * u).to(xt.dtype)
    else:
        wt = w
    if UPCAST:  # Triton's interpreter multiplies bfloat16 wrongly; the same values in float32 are exact
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    if TF32:
        return tl.dot(xt, wt, acc)
    else:
        return tl.dot(xt, wt, acc, input_precision="ieee")


@triton.autotune(configs=_configs(), key=["m_bucket", "N", "K", "G"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _grouped_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, w_keys_ptr, b_keys_ptr, scales_ptr,
    M, N, K, G, m_bucket,
    stride_xg, stride_xm, stride_xk, stride_wk, stride_wn, stride_og, stride_om, stride_on,
    KIND: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, SHARED: tl.constexpr,
    PERTURB_W: tl.constexpr, HAS_BIAS: tl.constexpr, PERTURB_B: tl.constexpr, TF32: tl.constexpr,
    UPCAST: tl.constexpr, GROUP_TILE: tl.constexpr, N_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # m_bucket (next power of two of M) is only an autotuning key: re-tune per size class, not per M
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    g0 = tl.program_id(2) * GROUP_TILE
    # slots past the last group repeat it (their stores are masked off)
    g_1 = tl.minimum(g0 + 1, G - 1)
    g_2 = tl.minimum(g0 + 2, G - 1)
    g_3 = tl.minimum(g0 + 3, G - 1)

    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if PERTURB_W:
            w = w.to(tl.float32)
        if SHARED:  # one x tile for every group
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x_shared = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
        else:
            x_shared = w  # unused
        acc0 = _accumulate(
            acc0, w, x_shared, x_ptr, g0, offs_m, offs_k, offs_n, k0, n0, M, N, K,
            stride_xg, stride_xm, stride_xk, w_keys_ptr, scales_ptr, KIND, TRANSPOSED, ALIGNED, PERTURB_W, SHARED, TF32, UPCAST,
        )  # fmt: skip
        if N_ACC > 1:
            acc1 = _accumulate(
                acc1, w, x_shared, x_ptr, g_1, offs_m, offs_k, offs_n, k0, n0, M, N, K,
                stride_xg, stride_xm, stride_xk, w_keys_ptr, scales_ptr, KIND, TRANSPOSED, ALIGNED, PERTURB_W, SHARED, TF32, UPCAST,
            )  # fmt: skip
        if N_ACC > 2:
            acc2 = _accumulate(
                acc2, w, x_shared, x_ptr, g_2, offs_m, offs_k, offs_n, k0, n0, M, N, K,
                stride_xg, stride_xm, stride_xk, w_keys_ptr, scales_ptr, KIND, TRANSPOSED, ALIGNED, PERTURB_W, SHARED, TF32, UPCAST,
            )  # fmt: skip
        if N_ACC > 3:
            acc3 = _accumulate(
                acc3, w, x_shared, x_ptr, g_3, offs_m, offs_k, offs_n, k0, n0, M, N, K,
                stride_xg, stride_xm, stride_xk, w_keys_ptr, scales_ptr, KIND, TRANSPOSED, ALIGNED, PERTURB_W, SHARED, TF32, UPCAST,
            )  # fmt: skip

    out_dtype = out_ptr.dtype.element_ty
    n_mask = offs_n < N
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    for i in tl.static_range(GROUP_TILE):
        g = tl.minimum(g0 + i, G - 1)
        if N_ACC == 1:
            acc = acc0
        elif i == 0:
            acc = acc0
        elif i == 1:
            acc = acc1
        elif i == 2:
            acc = acc2
        else:
            acc = acc3
        if HAS_BIAS:
            b = bias
            if PERTURB_B:
                seed_lo, seed_hi, pid = load_key(b_keys_ptr, g)
                v = direction_at(offs_n64, seed_lo, seed_hi, pid, KIND)
                # rounded to the bias dtype, as the reference's perturbed bias is
                b = (b + tl.load(scales_ptr + g) * v).to(out_dtype).to(tl.float32)
            acc = acc + b[None, :]
        out_ptrs = out_ptr + g.to(tl.int64) * stride_og + offs_m[:, None] * stride_om + offs_n64[None, :] * stride_on
        # the slot test as a tensor: Triton's interpreter cannot AND a block mask with a scalar one
        slot_ok = (offs_n * 0 + g0 + i) < G
        tl.store(out_ptrs, acc.to(out_dtype), mask=out_mask & slot_ok[None, :])


def _group_tile(groups: int, cap: int) -> int:
    """Balanced chunks of at most ``cap`` groups: 6 groups with cap 4 -> 2 chunks of 3."""
    chunks = triton.cdiv(groups, cap)
    return triton.cdiv(groups, chunks)


def _grouped_linear_triton(x, weight, bias, w_pid, b_pid, seeds, scales, kind, shared_input, transposed_weight):
    G = len(seeds)
    K = x.shape[-1]
    N = weight.shape[1] if transposed_weight else weight.shape[0]
    lead = x.shape[:-1] if shared_input else x.shape[1:-1]
    x3 = x.reshape(1 if shared_input else G, -1, K)
    M = x3.shape[1]
    out = torch.empty(G, M, N, dtype=x.dtype, device=x.device)
    if G == 0 or M == 0 or N == 0:
        return out.view(G, *lead, N)

    perturb_w = w_pid is not None
    perturb_b = bias is not None and b_pid is not None
    shared_product = shared_input and not perturb_w
    group_tile = _group_tile(G, MAX_SHARED_GROUP_TILE if shared_product else MAX_GROUP_TILE)
    # directions run along the stored rows: K for [N, K] weights, N for [K, N] ones
    row_len = N if transposed_weight else K
    aligned = row_len % alignment(kind) == 0
    if transposed_weight:
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    else:
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    dev = x.device
    w_keys = key_words(seeds, w_pid if perturb_w else 0, dev)
    b_keys = key_words(seeds, b_pid if perturb_b else 0, dev)
    scales_t = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=dev)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(G, group_tile))

    _grouped_linear_kernel[grid](
        x3, weight, bias if bias is not None else weight, out, w_keys, b_keys, scales_t,
        M, N, K, G, triton.next_power_of_2(M),
        0 if shared_input else x3.stride(0), x3.stride(1), x3.stride(2),
        stride_wk, stride_wn, out.stride(0), out.stride(1), out.stride(2),
        KIND=KIND_CODE[kind], TRANSPOSED=transposed_weight, ALIGNED=aligned, SHARED=shared_input,
        PERTURB_W=perturb_w, HAS_BIAS=bias is not None, PERTURB_B=perturb_b,
        TF32=x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32, UPCAST=interpreting(),
        GROUP_TILE=group_tile, N_ACC=1 if shared_product else group_tile,
    )  # fmt: skip
    return out.view(G, *lead, N)


# --------------------------------------------------------------------------- entry point


def _check_groups(x: torch.Tensor, seeds, scales, shared_input: bool) -> None:
    if len(seeds) != len(scales):
        raise ValueError(f"{len(seeds)} seeds but {len(scales)} scales; give one (seed, scale) per group")
    if not shared_input and x.shape[0] != len(seeds):
        raise ValueError(
            f"x has {x.shape[0]} groups in its first dimension but {len(seeds)} seeds were given; "
            "pass shared_input=True if every group reads the same x"
        )


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_pid: int | None,
    b_pid: int | None,
    seeds: Sequence[int],
    scales: Sequence[float],
    kind: str,
    *,
    shared_input: bool,
    transposed_weight: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """``out[g] = x_g @ (W + scales[g] U_g)^T + (b + scales[g] v_g)`` for every group g.

    Args:
        x: ``[G, *, K]`` (group g reads ``x[g]``) or, with ``shared_input``, ``[*, K]``
            read by every group. ``*`` is any number of row dimensions (``[G, B, S, K]``).
        weight: ``[N, K]`` as ``nn.Linear`` stores it, or ``[K, N]`` with
            ``transposed_weight`` (GPT-2 ``Conv1D``: ``out = x @ W``).
        bias: ``[N]`` or None.
        w_pid, b_pid: stream ids of weight and bias; None means that tensor is frozen.
        seeds: one direction seed per group, integers in ``[0, 2**64)``.
        scales: one float per group; 0.0 gives the unperturbed weights.
        kind: ``"rademacher"`` or ``"gaussian"``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"``; see :func:`zo_fx.kernels.pick`.

    Returns:
        ``[G, *, N]`` in x's dtype. The kernel accumulates in float32 (fp32 inputs use IEEE
        fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, like F.linear).

    Example:
        >>> x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
        >>> grouped_linear(x, w, None, 17, None, [5, 5], [1e-3, -1e-3], "rademacher", shared_input=False).shape
        torch.Size([2, 3, 4])
    """
    kind = check_kind(kind)
    _check_groups(x, seeds, scales, shared_input)
    k_w = weight.shape[0] if transposed_weight else weight.shape[1]
    if weight.dim() != 2 or x.shape[-1] != k_w:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must match the weight's "
            f"{'first' if transposed_weight else 'second'} dimension ({tuple(weight.shape)})"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast one so that they match")
    if pick(impl, x) == "triton":
        return _grouped_linear_triton(x, weight, bias, w_pid, b_pid, seeds, scales, kind, shared_input, transposed_weight)
    return grouped_linear_reference(
        x, weight, bias, w_pid, b_pid, seeds, scales, kind,
        shared_input=shared_input, transposed_weight=transposed_weight,
    )  # fmt: skip


__all__ = ["grouped_linear", "grouped_linear_reference"]
