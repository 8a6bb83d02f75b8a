"""Grouped perturbed linear: G GEMMs ``x_g @ (W + s_g U_g)^T + (b + s_g v_g)`` from one weight read.

A ZOModule evaluates G groups (MeZO: +eps and -eps; FZOO: the unperturbed weights and N
directions) in one batch. Materialising ``W + s_g U_g`` per group costs G weight-sized
writes and reads per step; this kernel instead loads each W tile once and forms every
group's perturbed tile in registers, with ``U_g`` regenerated from its seed
(:mod:`zo_fx.kernels.tiles`).

How groups are tiled
--------------------
The grid is (M tiles, N tiles, group pairs). A program owns ``GROUP_TILE`` consecutive
groups, 1 or 2, chosen by the autotuner together with the tile shape. At each K step it
loads the W tile once and, for each of its groups, forms ``W + s_g U_g`` in float32,
rounds it to the input dtype (the rounding :func:`zo_fx.kernels.perturb.perturbed`
does) and accumulates ``x_g @ .`` in that group's float32 accumulator. With
``GROUP_TILE = 2`` one W load serves both groups, so MeZO's two groups read W once;
larger G are covered by more programs along the group axis, each reading W once for its
pair. Pairs and not more: every extra group costs a float32 accumulator in registers, and
ptxas already spills two groups' 128x128 tiles (see ``_configs``); the autotuner weighs
one load for two groups on a smaller tile against one group on a larger one.

With a shared input the second group's x tile is the first one's (``stride_xg = 0``),
served from cache. When W is also frozen (the frozen prefix of a partially trained
model) every group has the same product: it is computed once per program and each
group adds its own bias.

The direction tile is regenerated for every M tile (on the aligned path that is one
Philox call per 32 signs, or per 4 normals); ``BLOCK_M`` up to 128 keeps this small next
to the tile's GEMM work for Rademacher, while Gaussian directions (log, sqrt, cos, sin
per pair) cost noticeably more. fp32 inputs take IEEE fp32 products unless
``torch.backends.cuda.matmul.allow_tf32`` is set, as F.linear does.

Element order: ``U_g`` is the direction of ``(seed_g, w_pid)`` shaped like W as stored,
so element ``(n, k)`` of an ``[N, K]`` weight (``nn.Linear``) has index ``n*K + k`` and
element ``(k, n)`` of a ``[K, N]`` weight (GPT-2 ``Conv1D``, ``addmm``) has ``k*N + n``.
"""

import os
from collections.abc import Sequence

import torch

from zo_fx.streams.layout import check_kind

from ._support import interpreting, key_words, tl, triton
from .dispatch import pick
from .perturb import perturbed_or_base
from .tiles import KIND_CODE, alignment, direction_at, direction_tile, load_key, round_to

#: "out_in": [N, K] (nn.Linear); "in_out": [K, N] (GPT-2 Conv1D, addmm, mm)
WEIGHT_LAYOUTS = ("out_in", "in_out")


# --------------------------------------------------------------------------- reference


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_pid: int | None,
    b_pid: int | None,
    seed: int,
    scale: float,
    kind: str,
    weight_layout: str = "out_in",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One group's product ``x @ (W + scale U)^T + (b + scale v)`` (``in_out``: ``x @ (W + scale U)``).

    The one perturbed linear of the torch path: the reference below, the graph op's
    group loop and the fused output head all call it. It forms the perturbed weight
    (:func:`zo_fx.kernels.perturb.perturbed`: float32, rounded once to the weight's
    dtype) and drops it on return, so at most one is alive. A None pid or a zero scale
    leaves that tensor unperturbed. ``out`` (``[rows, N]``) receives the 2-D product.
    """
    w = perturbed_or_base(weight, seed, w_pid, scale, kind)
    b = perturbed_or_base(bias, seed, b_pid, scale, kind)
    w_t = w.t() if weight_layout == "out_in" else w
    rows = x.reshape(-1, x.shape[-1])
    y = torch.mm(rows, w_t, out=out) if b is None else torch.addmm(b, rows, w_t, out=out)
    return y.view(*x.shape[:-1], y.shape[-1])


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
    weight_layout: str = "out_in",
) -> torch.Tensor:
    """The specification of :func:`grouped_linear`: loop over groups, one perturbed weight at a time.

    Arguments as in :func:`grouped_linear`; each group is :func:`perturbed_linear`.
    """
    kind = check_kind(kind)
    _check_groups(x, seeds, scales, shared_input)
    _check_layout(weight_layout)
    outs = [
        perturbed_linear(x if shared_input else x[g], weight, bias, w_pid, b_pid, seed, scale, kind, weight_layout)
        for g, (seed, scale) in enumerate(zip(seeds, scales))
    ]
    return torch.stack(outs)


# --------------------------------------------------------------------------- kernel


def _configs():
    def config(bm, bn, bk, group_tile, warps, stages):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_TILE": group_tile}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    if interpreting():  # one config, no tuning: the interpreter runs programs one by one in numpy
        return [config(32, 64, 32, 2, 4, 1)]
    if os.environ.get("ZO_FX_AUTOTUNE", "1") == "0":  # tests on GPU: one compile per variant, no tuning
        return [config(64, 64, 32, 2, 4, 3)]
    # Hopper (sm_90) bf16 shapes: the usual 64-128 tiles with 3-4 stages and one accumulator,
    # or two groups per program on smaller tiles. ptxas (Triton 3.9, sm_90) fits one group's
    # 128x128 tile in 255 registers without spilling; two groups at 128x128 spill, so
    # GROUP_TILE=2 only comes with 128x64 / 64x64 tiles. BLOCK_K and BLOCK_N stay multiples
    # of 32 so that the aligned direction path (philox.direction_tile) applies.
    return [
        config(128, 128, 64, 1, 8, 3),
        config(128, 64, 64, 1, 4, 4),
        config(64, 128, 64, 1, 4, 4),
        config(128, 64, 64, 2, 8, 3),
        config(64, 64, 64, 2, 4, 3),
    ]


@triton.jit
def _accumulate(
    acc, w, x_ptr, g, offs_m, offs_k, offs_n, k0, n0, M, N, K,
    stride_xg, stride_xm, stride_xk, keys_ptr, scales_ptr,
    KIND: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, PERTURB_W: tl.constexpr,
    TF32: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """``acc + x_g @ (W + s_g U_g)`` for one [BLOCK_K, BLOCK_N] tile ``w`` of W^T (float32 if perturbed)."""
    x_ptrs = x_ptr + g.to(tl.int64) * stride_xg + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    xt = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
    if PERTURB_W:
        scale = tl.load(scales_ptr + g)
        seed_lo, seed_hi, pid = load_key(keys_ptr, g)
        if TRANSPOSED:  # W is [K, N]: rows k, element k*N + n
            u = direction_tile(offs_k, offs_n, n0, N, seed_lo, seed_hi, pid, KIND, ALIGNED)
        else:  # W is [N, K]: rows n, element n*K + k, generated [BLOCK_N, BLOCK_K] then transposed
            u = tl.trans(direction_tile(offs_n, offs_k, k0, K, seed_lo, seed_hi, pid, KIND, ALIGNED))
        wt = round_to(w + scale * u, xt.dtype, INTERPRETED)
    else:
        wt = w
    if INTERPRETED:  # Triton's interpreter multiplies bfloat16 wrongly; the same values in float32 are exact
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    if TF32:
        return tl.dot(xt, wt, acc)
    else:
        return tl.dot(xt, wt, acc, input_precision="ieee")


@triton.autotune(configs=_configs(), key=["m_bucket", "N", "K", "G"])
@triton.jit
def _grouped_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, w_keys_ptr, b_keys_ptr, scales_ptr,
    M, N, K, G, m_bucket,
    stride_xg, stride_xm, stride_xk, stride_wk, stride_wn, stride_og, stride_om, stride_on,
    KIND: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, SHARED_PRODUCT: tl.constexpr,
    PERTURB_W: tl.constexpr, HAS_BIAS: tl.constexpr, PERTURB_B: tl.constexpr, TF32: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_TILE: tl.constexpr,
):  # fmt: skip
    # m_bucket (next power of two of M) is only an autotuning key: re-tune per size class, not per M
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    g0 = tl.program_id(2) * GROUP_TILE
    g1 = tl.minimum(g0 + 1, G - 1)  # a slot past the last group repeats it; its store is masked off

    acc0 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n64[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # the one load of this W tile
        if PERTURB_W:
            w = w.to(tl.float32)
        acc0 = _accumulate(
            acc0, w, x_ptr, g0, offs_m, offs_k, offs_n, k0, n0, M, N, K, stride_xg, stride_xm, stride_xk,
            w_keys_ptr, scales_ptr, KIND, TRANSPOSED, ALIGNED, PERTURB_W, TF32, INTERPRETED,
        )  # fmt: skip
        if GROUP_TILE == 2:
            if not SHARED_PRODUCT:  # (a shared product is the same for every group: made once)
                acc1 = _accumulate(
                    acc1, w, x_ptr, g1, offs_m, offs_k, offs_n, k0, n0, M, N, K,
                    stride_xg, stride_xm, stride_xk, w_keys_ptr, scales_ptr,
                    KIND, TRANSPOSED, ALIGNED, PERTURB_W, TF32, INTERPRETED,
                )  # fmt: skip

    out_dtype = out_ptr.dtype.element_ty
    n_mask = offs_n < N
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    for i in tl.static_range(GROUP_TILE):
        g = tl.minimum(g0 + i, G - 1)
        acc = acc0
        if i == 1:
            if not SHARED_PRODUCT:
                acc = acc1
        if HAS_BIAS:
            b = bias
            if PERTURB_B:
                seed_lo, seed_hi, pid = load_key(b_keys_ptr, g)
                v = direction_at(offs_n64, seed_lo, seed_hi, pid, KIND)
                # rounded to the bias dtype, as the reference's perturbed bias is
                b = round_to(b + tl.load(scales_ptr + g) * v, out_dtype, INTERPRETED).to(tl.float32)
            acc = acc + b[None, :]
        out_ptrs = (
            out_ptr + g.to(tl.int64) * stride_og + offs_m[:, None] * stride_om + offs_n64[None, :] * stride_on
        )
        # the slot test as a tensor: Triton's interpreter cannot AND a block mask with a scalar one
        slot_ok = (offs_n * 0 + g0 + i) < G
        tl.store(out_ptrs, round_to(acc, out_dtype, INTERPRETED), mask=out_mask & slot_ok[None, :])


def _grouped_linear_triton(x, weight, bias, w_pid, b_pid, seeds, scales, kind, shared_input, weight_layout):
    transposed_weight = weight_layout == "in_out"
    G = len(seeds)
    K = x.shape[-1]
    N = weight.shape[1] if transposed_weight else weight.shape[0]
    lead = x.shape[:-1] if shared_input else x.shape[1:-1]
    x3 = x.reshape(1 if shared_input else G, -1, K)
    M = x3.shape[1]
    out = torch.empty(G, M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.view(G, *lead, N)

    perturb_w = w_pid is not None
    perturb_b = bias is not None and b_pid is not None
    bias = bias.contiguous() if bias is not None else None
    # directions run along the stored rows: K for [N, K] weights, N for [K, N] ones
    row_len = N if transposed_weight else K
    if transposed_weight:
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    else:
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    dev = x.device
    w_keys = key_words(seeds, w_pid if perturb_w else 0, dev)
    b_keys = key_words(seeds, b_pid if perturb_b else 0, dev)
    scales_t = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=dev)

    def grid(meta):
        return (
            triton.cdiv(M, meta["BLOCK_M"]),
            triton.cdiv(N, meta["BLOCK_N"]),
            triton.cdiv(G, meta["GROUP_TILE"]),
        )

    _grouped_linear_kernel[grid](
        x3, weight, bias if bias is not None else weight, out, w_keys, b_keys, scales_t,
        M, N, K, G, triton.next_power_of_2(M),
        0 if shared_input else x3.stride(0), x3.stride(1), x3.stride(2),
        stride_wk, stride_wn, out.stride(0), out.stride(1), out.stride(2),
        KIND=KIND_CODE[kind], TRANSPOSED=transposed_weight, ALIGNED=row_len % alignment(kind) == 0,
        SHARED_PRODUCT=shared_input and not perturb_w, PERTURB_W=perturb_w, HAS_BIAS=bias is not None,
        PERTURB_B=perturb_b, TF32=x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32,
        INTERPRETED=interpreting(),
    )  # fmt: skip
    return out.view(G, *lead, N)


# --------------------------------------------------------------------------- entry point


def _check_layout(weight_layout: str) -> None:
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}; got {weight_layout!r}")


def _check_groups(x: torch.Tensor, seeds, scales, shared_input: bool) -> None:
    if not seeds:
        raise ValueError("grouped_linear needs at least one group (one seed and one scale)")
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
    weight_layout: str = "out_in",
    impl: str = "auto",
) -> torch.Tensor:
    """``out[g] = x_g @ (W + scales[g] U_g)^T + (b + scales[g] v_g)`` for every group g.

    Args:
        x: ``[G, *, K]`` (group g reads ``x[g]``) or, with ``shared_input``, ``[*, K]``
            read by every group. ``*`` is any number of row dimensions (``[G, B, S, K]``).
        weight: ``[N, K]`` as ``nn.Linear`` stores it (``weight_layout="out_in"``), or
            ``[K, N]`` with ``weight_layout="in_out"`` (GPT-2 ``Conv1D``, ``addmm``, ``mm``:
            ``out = x @ W``).
        bias: ``[N]`` or None.
        w_pid, b_pid: stream ids of weight and bias; None means that tensor is frozen.
        seeds: one direction seed per group, integers in ``[0, 2**64)``.
        scales: one float per group; 0.0 gives the unperturbed weights.
        kind: ``"rademacher"`` or ``"gaussian"``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"``; see :func:`zo_fx.kernels.dispatch.pick`.

    Returns:
        ``[G, *, N]`` in x's dtype. The kernel accumulates in float32 (fp32 inputs use IEEE
        fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set, like F.linear).

    Example:
        >>> x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
        >>> out = grouped_linear(x, w, None, 17, None, [5, 5], [1e-3, -1e-3], "gaussian", shared_input=False)
        >>> out.shape
        torch.Size([2, 3, 4])
    """
    kind = check_kind(kind)
    _check_groups(x, seeds, scales, shared_input)
    _check_layout(weight_layout)
    k_dim = 0 if weight_layout == "in_out" else 1
    if weight.dim() != 2 or x.shape[-1] != weight.shape[k_dim]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must match dimension {k_dim} of the "
            f"{weight_layout} weight {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast one so that they match")
    if pick(impl, x, weight, bias) == "triton":
        return _grouped_linear_triton(
            x, weight, bias, w_pid, b_pid, seeds, scales, kind, shared_input, weight_layout
        )
    return grouped_linear_reference(
        x,
        weight,
        bias,
        w_pid,
        b_pid,
        seeds,
        scales,
        kind,
        shared_input=shared_input,
        weight_layout=weight_layout,
    )


__all__ = ["WEIGHT_LAYOUTS", "grouped_linear", "grouped_linear_reference", "perturbed_linear"]
