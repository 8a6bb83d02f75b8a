"""Cache-blocked grouped perturbed GEMM: the torch path's way to read each weight once for all groups.

The plain torch path (:func:`zo_fx.kernels.linear.perturbed_linear` per group) forms one
weight-sized ``W + s_g U_g`` per group: G reads of W, G weight-sized writes and G reads
back, and G generations of the direction even when groups share a seed (MeZO's +eps and
-eps). Here the weight is walked in *tiles* of consecutive stored rows, sized for the
CPU cache. Per tile, one call generates the direction tile of every distinct seed once
and forms every perturbed group's tile from it (``[G', rows, cols]``, in cache), and one
batched GEMM multiplies each group's rows by its tile. So per step a weight crosses
memory once, each distinct direction is generated once, and no weight-sized temporary
exists at all: scratch is G' tiles within :data:`TILE_BYTES` together (plus the
distinct directions' values on one tile), whatever the weight's size, so a per-group copy
of a weight never exists once a weight is larger than a tile.

Groups with a zero scale (FZOO's group 0, a frozen weight) take one plain GEMM over the
whole weight, shared by all of them when the input is shared.

Values: a group's perturbed tile is rounded once to the weight's dtype, exactly as
:func:`zo_fx.kernels.perturb.perturbed` rounds the whole copy, so the products differ
from the per-group path only by the GEMM's summation order (a few ulps of the dtype).
``in_out`` weights (``[K, N]``, GPT-2's Conv1D) are tiled along K and their partial
products summed in the output; low-precision (bf16/fp16) ``in_out`` weights therefore
go through the per-group path, which keeps one fp32-accumulated GEMM per group.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

from zo_fx.streams.layout import (
    RADEMACHER,
    check_kind,
    key_tensors,
    normals_from_columns,
    per_block,
    philox_block_words,
    sample,
    sign_bits_from_words,
)

from . import native
from ._chunks import accumulation_dtype, runner

#: the tile budget when the machine's caches cannot be read: half the 32 MiB L3 of the 2-core
#: EPYC the sizes were first measured on. ``benchmarks/tile_size.py`` (results/tile_size.md): FZOO's
#: 8 perturbed fp32 groups were fastest at 2**19-element tiles (16 MiB together), MeZO's 2 at 2**21
#: (16 MiB), on weights from 576x576 to 8192x2048; 2**15-2**16 pay a call and a narrow GEMM per
#: tile, and tiles beyond the budget spill out of the L3 (up to 1.5x slower).
FALLBACK_TILE_BYTES = 16 << 20
#: the budget's bounds: every group's tiles together stay between these, whatever the cache says
MIN_TILE_BYTES, MAX_TILE_BYTES = 2 << 20, 64 << 20


def _cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[int, int]:
    """Bytes of each data/unified cache level of CPU 0 (``{2: ..., 3: ...}``), from sysfs; {} if unreadable."""
    sizes: dict[int, int] = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return sizes
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
        try:
            sizes[level] = int(text.rstrip("KkMmGg")) * unit
        except ValueError:
            continue
    return sizes


def _sysconf_cache(name: str) -> int:
    try:
        return max(0, int(os.sysconf(name)))
    except (AttributeError, OSError, ValueError):
        return 0


def tile_budget() -> dict:
    """The tile budget picked for this machine and why: ``{"tile_bytes", "source", "caches", "reason"}``.

    Half the last-level cache (the L3 that CPU 0 shares; the L2 where there is no L3), rounded
    down to a power of two and kept within [MIN_TILE_BYTES, MAX_TILE_BYTES]: the G' perturbed
    tiles of one step of the walk must still be in cache when the GEMM reads them, with room
    left for the GEMM's own input and output panels. ``ZO_FX_TILE_BYTES`` overrides it; a
    machine whose caches cannot be read (no sysfs, no sysconf) gets :data:`FALLBACK_TILE_BYTES`.
    """
    caches = _cache_sizes()
    if not caches:
        for level, name in ((2, "SC_LEVEL2_CACHE_SIZE"), (3, "SC_LEVEL3_CACHE_SIZE")):
            size = _sysconf_cache(name)
            if size:
                caches[level] = size
    override = os.environ.get("ZO_FX_TILE_BYTES")
    if override:
        return {"tile_bytes": int(override), "source": "ZO_FX_TILE_BYTES", "caches": caches,
                "reason": "set by the environment"}
    last = max((lvl for lvl in caches if lvl >= 2), default=None)
    if last is None:
        return {"tile_bytes": FALLBACK_TILE_BYTES, "source": "fallback", "caches": caches,
                "reason": "cache sizes unreadable: the constant measured on a 32 MiB-L3 EPYC"}
    half = caches[last] // 2
    picked = 1 << max(0, half.bit_length() - 1) if half else MIN_TILE_BYTES
    picked = min(MAX_TILE_BYTES, max(MIN_TILE_BYTES, picked))
    return {"tile_bytes": picked, "source": f"L{last}", "caches": caches,
            "reason": f"half the L{last} ({caches[last] >> 10} KiB), as a power of two within "
                      f"[{MIN_TILE_BYTES >> 20}, {MAX_TILE_BYTES >> 20}] MiB"}


def describe_tiles() -> str:
    """One line for benchmark output: the budget, where it came from, and the caches seen."""
    b = tile_budget()
    caches = ", ".join(f"L{lvl} {size >> 10} KiB" for lvl, size in sorted(b["caches"].items())) or "none read"
    return f"tile budget {b['tile_bytes'] >> 10} KiB ({b['source']}: {b['reason']}; caches: {caches})"


#: bytes of all perturbed groups' tiles of one step of the walk together, picked from this
#: machine's caches at import (:func:`tile_budget` says how)
TILE_BYTES = tile_budget()["tile_bytes"]
#: bounds of the tile size in elements, whatever the number of groups
MIN_TILE, MAX_TILE = 1 << 16, 1 << 21
#: a fixed tile size in elements overriding the budget (None: sized by TILE_BYTES); tests set
#: it small so that tiny models' weights span many tiles
TILE_ELEMENTS: int | None = None


def tile_elements(groups: int, itemsize: int) -> int:
    """Elements per tile when ``groups`` perturbed tiles of ``itemsize`` bytes share the budget."""
    if TILE_ELEMENTS is not None:
        return TILE_ELEMENTS
    return min(MAX_TILE, max(MIN_TILE, TILE_BYTES // (max(groups, 1) * itemsize)))


def _perturbed_tiles(base, scales, which, block0, seed_lo, seed_hi, pid, tag, kind: str, out=None):
    """``[G', n]``: ``base + scales[i] * u(seeds[which[i]])`` on one tile, each distinct seed generated once.

    The native kernel (:mod:`zo_fx.kernels.native`) when it can take the tile: Rademacher bit for bit
    the torch function below, Gaussian within a few float32 ulps of it (its own log/cos/sin, the same
    on every CPU; docs/native.md). Anything else: the torch function, compiled for large tiles.
    ``out``: a ``[G', n]`` buffer the native kernel may write into (the torch path always returns a
    new tensor).
    """
    if native.usable(base):
        tiles = native.perturbed_tiles(base, scales, which, block0, seed_lo, seed_hi, pid, tag, kind, out)
        if tiles is not None:
            return tiles
    make = runner(_perturbed_tiles_torch, base.numel() * which.numel())  # compiled for large tiles
    return make(base, scales, which, block0, seed_lo, seed_hi, pid, tag, kind)


def _perturbed_tiles_torch(base, scales, which, block0, seed_lo, seed_hi, pid, tag, kind: str):
    """The torch reference of :func:`_perturbed_tiles`.

    Rademacher: ``where(sign is -1, base - s, base + s)``, the same rounding as
    ``base + s * sign`` without the multiply (twice as fast compiled, bit for bit equal).
    """
    n = base.shape[0]
    acc = accumulation_dtype(base.dtype)
    pb = per_block(kind)
    blocks = block0 + torch.arange((n + pb - 1) // pb, dtype=torch.int64, device=base.device)
    words = philox_block_words(blocks, seed_lo.unsqueeze(1), seed_hi.unsqueeze(1), pid, tag)  # [S, blocks] each
    b, s = base.to(acc), scales.to(acc).unsqueeze(1)
    if kind == RADEMACHER:
        negative = sign_bits_from_words(torch.stack(words, dim=-1)).reshape(seed_lo.shape[0], -1)[:, :n]
        return torch.where(negative[which], b - s, b + s).to(base.dtype)
    u = normals_from_columns(*words).reshape(seed_lo.shape[0], -1)[:, :n].to(acc)
    return (b + s * u[which]).to(base.dtype)


def _scaled_tiles(base, factor, scales, which, seeds, pid: int, start: int, kind: str) -> torch.Tensor:
    """``[G', n]``: ``base + scales[i] * (factor * u(seeds[which[i]]))`` on one tile, each distinct seed made once.

    The per-element scale of :mod:`zo_fx.kernels.scaling`, with the roundings of the per-group path
    (``perturb._scaled``): the values in ``factor``'s dtype, times the factor, times the scale, plus the
    base, rounded once to the weight's dtype.
    """
    n = base.numel()
    acc = factor.dtype
    u = torch.stack([sample(seed, pid, start, n, kind, dtype=acc) for seed in seeds])
    v = factor.unsqueeze(0) * u
    return (base.to(acc).unsqueeze(0) + scales.to(acc).unsqueeze(1) * v[which]).to(base.dtype)


def tile_rows(rows: int, cols: int, kind: str, tile: int) -> int:
    """Stored rows per tile: about ``tile`` elements, and every tile starts on a Philox block."""
    pb = per_block(kind)
    align = pb // math.gcd(cols, pb)  # rows whose element count is a multiple of the block
    return min(rows, max(align, (tile // max(cols, 1)) // align * align))


def supports(weight: torch.Tensor, weight_layout: str, *inputs: torch.Tensor | None) -> bool:
    """Whether the blocked path takes this weight (else the per-group path runs).

    Not under autograd: the tiles are formed in no_grad code, so a product autograd should
    track (``weight`` or an input requiring grad with grad enabled) stays on the per-group
    path, which is differentiable.
    """
    if weight.dim() != 2 or not weight.is_contiguous() or weight.numel() == 0:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, *inputs)):
        return False
    return weight_layout == "out_in" or weight.dtype in (torch.float32, torch.float64)


@torch.no_grad()
def blocked_grouped_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_pid: int | None,
    seeds: Sequence[int],
    scales: Sequence[float],
    kind: str,
    weight_layout: str,
    *,
    shared_input: bool,
    tile: int | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[G, R, N]``: group g's rows times ``W + scales[g] * U(seeds[g])`` (no bias).

    Args:
        x: ``[G, R, K]`` (one slice of rows per group) or, with ``shared_input``, ``[R, K]``
            shared by every group.
        weight: ``[N, K]`` (``out_in``) or ``[K, N]`` (``in_out``), contiguous.
        w_pid: the weight's stream id; None for a frozen weight (every group plain).
        seeds, scales: one per group; a zero scale is the plain weight.
        tile: elements per tile; default :func:`tile_elements` for the moved groups.
        factor: a per-element direction scale shaped like ``weight`` in the accumulation dtype
            (HiZOO's ``1 / sqrt(H)``, :mod:`zo_fx.kernels.scaling`): group g's tile is then
            ``W + scales[g] * (factor * U(seeds[g]))``, rounded as :func:`zo_fx.kernels.perturb.perturbed`
            rounds it.
    """
    kind = check_kind(kind)
    groups = len(seeds)
    out_in = weight_layout == "out_in"
    rows_w, cols_w = weight.shape
    n_out = rows_w if out_in else cols_w
    r = x.shape[0] if shared_input else x.shape[1]
    out = torch.empty(groups, r, n_out, dtype=torch.result_type(x, weight), device=x.device)
    plain = [g for g in range(groups) if w_pid is None or scales[g] == 0.0]
    moved = [g for g in range(groups) if g not in plain]
    _plain_products(x, weight, out, plain, out_in, shared_input)
    if not moved:
        return out
    distinct = sorted({seeds[g] for g in moved})
    which = torch.tensor([distinct.index(seeds[g]) for g in moved], device=x.device)
    lo, hi, pid_t, tag = key_tensors(distinct, w_pid, kind, x.device)
    scale_t = torch.tensor([scales[g] for g in moved], dtype=torch.float64, device=x.device)
    flat = weight.reshape(-1)
    pb = per_block(kind)
    step = tile_rows(rows_w, cols_w, kind, tile or tile_elements(len(moved), weight.element_size()))
    index = torch.tensor(moved, device=x.device)
    contiguous_moved = moved == list(range(moved[0], moved[0] + len(moved)))
    if shared_input:
        xs = x
    else:  # the moved groups' rows: a view when they are consecutive (FZOO's 1..N, MeZO's both)
        xs = x[moved[0] : moved[-1] + 1] if contiguous_moved else x[index]
    acc = None if out_in else torch.zeros(len(moved), r, n_out, dtype=out.dtype, device=x.device)
    native_tiles = factor is None and native.usable(weight)  # the kernel writes the tiles into a kept buffer
    scratch = tile_scratch(len(moved) * step * cols_w, weight.dtype) if native_tiles else None
    for r0 in range(0, rows_w, step):
        r1 = min(rows_w, r0 + step)
        base = flat[r0 * cols_w : r1 * cols_w]
        block0 = torch.tensor(r0 * cols_w // pb, dtype=torch.int64, device=x.device)
        buffer = None if scratch is None else scratch[: len(moved) * base.numel()].view(len(moved), base.numel())
        if factor is None:
            tiles = _perturbed_tiles(base, scale_t, which, block0, lo, hi, pid_t, tag, kind, buffer)
        else:
            tiles = _scaled_tiles(base, factor.reshape(-1)[r0 * cols_w : r1 * cols_w], scale_t, which, distinct,
                                  w_pid, r0 * cols_w, kind)
        tiles = tiles.view(len(moved), r1 - r0, cols_w)
        if out_in:  # tile rows are output features r0..r1: written in place, no temporary
            _tile_products(xs, tiles, out, moved, index, contiguous_moved, r0, r1, shared_input)
        else:  # tile rows are input features r0..r1: partial products summed over tiles
            xk = xs[..., r0:r1]
            if shared_input:
                acc += torch.matmul(xk, tiles)
            else:
                acc.baddbmm_(xk, tiles)
    if acc is not None:
        out[index] = acc
    return out


_scratch = threading.local()


def tile_scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU buffer of ``numel`` elements that the native kernel writes the perturbed tiles into.

    One buffer per dtype and thread, kept between calls and grown to the largest request (at most
    the tile budget's worth of tiles). A fresh tensor per call costs more than forming the tiles
    themselves: a weight that is one tile (every weight of a small model under a large budget) gets
    a new multi-MiB allocation per group step, which the allocator maps and the kernel zero-fills
    page by page (0.43 s of page faults in a 5 s FZOO step of SmolLM2-135M). The tiles never
    outlive the call that forms them, so the buffer is free again when the call returns. On the CPU
    whatever torch's default device: only the (CPU-only) native kernel writes into it.
    :func:`clear_tile_scratch` lets it go.
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buffers[dtype] = buf = torch.empty(numel, dtype=dtype, device="cpu")
    return buf[:numel]


def clear_tile_scratch() -> None:
    """Release this thread's tile buffers (benchmarks call it so one method's buffer is not another's memory)."""
    _scratch.__dict__.pop("buffers", None)


def _tile_products(xs, tiles, out, moved, index, contiguous_moved: bool, r0: int, r1: int, shared: bool) -> None:
    """``out[g, :, r0:r1] = x_g @ tile_g^T`` for the moved groups, straight into ``out`` when they are consecutive."""
    x_b = xs.expand(tiles.shape[0], *xs.shape) if shared else xs  # a shared input: batch stride 0, no copy
    if contiguous_moved:
        torch.bmm(x_b, tiles.transpose(1, 2), out=out[moved[0] : moved[-1] + 1, :, r0:r1])
    else:
        out[index, :, r0:r1] = torch.bmm(x_b, tiles.transpose(1, 2))


def _plain_products(x, weight, out, plain: list[int], out_in: bool, shared_input: bool) -> None:
    """Groups on the unperturbed weight: one GEMM for all of them."""
    if not plain:
        return
    w_t = weight.t() if out_in else weight
    if shared_input:  # one product, written into the first plain group's slice and copied to the others
        torch.matmul(x, w_t, out=out[plain[0]])
        for g in plain[1:]:
            out[g] = out[plain[0]]
        return
    if plain == list(range(plain[0], plain[-1] + 1)):
        rows = x[plain[0] : plain[-1] + 1]
        torch.matmul(rows.reshape(-1, rows.shape[-1]), w_t, out=out[plain[0] : plain[-1] + 1].view(-1, out.shape[-1]))
        return
    for g in plain:
        torch.mm(x[g], w_t, out=out[g])


__all__ = ["TILE_BYTES", "blocked_grouped_matmul", "clear_tile_scratch", "describe_tiles", "supports", "tile_budget",
           "tile_elements", "tile_rows"]
