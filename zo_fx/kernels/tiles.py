"""Philox4x32-10 and the direction streams inside Triton kernels.

The ``@triton.jit`` helpers here produce exactly the bits of
:mod:`zo_fx.streams.philox` and :mod:`zo_fx.streams.layout`, laid out as
``docs/directions.md`` freezes them; the other kernels (linear, update, embedding)
generate their directions through them and nowhere else.

On GPU the 32x32-bit multiply is native: ``tl.umulhi`` gives the high word and a plain
uint32 multiply (which wraps) the low word, so the torch version's 16-bit split is not
needed. The round structure mirrors ``triton.language.random.philox_impl``; zo_fx keeps
its own copy because the counter and key words are part of its frozen layout.

Two ways to generate
--------------------
* ``*_at(k, ...)``: element by element, for any int64 index tensor ``k``. Each element
  runs a whole Philox call, i.e. 128x (Rademacher) or 4x (Gaussian) more work than needed.
* ``*_rows(row_start, ..., C)``: a ``[R, C]`` tile of rows of consecutive elements
  ``row_start[r] + c``. One Philox call per 32-bit word (Rademacher; 1/32 of a call per
  element) or per 4-element block (Gaussian; 2 log, 2 sqrt, 2 cos, 2 sin per 4 elements,
  as in torch), then expanded with broadcasts and a reshape. It needs every row start to
  sit on a word (32) / block (4) boundary, which holds for a weight tile whenever the
  row length is a multiple of 32 / 4 and the tile width is too: the kernels check that
  in their launchers and pass ``ALIGNED``.

``direction_tile`` picks between them. Gaussian values use ``tl.log``/``tl.sqrt``/
``tl.cos``/``tl.sin``; their last bits can differ from torch's (a few float32 ulps, see
``docs/directions.md``), while the signs and the uniforms are bit-identical.

Also here: ``round_to``, the float32 -> tensor dtype rounding every kernel ends with
(round to nearest even, as the GPU does, also under the interpreter).

Only Triton builtins are used here and in the other kernel modules, none of Triton's own
``@jit`` helpers (``tl.zeros``, ``tl.zeros_like``): those are built when ``triton`` is
first imported, so in a process that imported Triton before setting
``TRITON_INTERPRET=1`` interpreted kernels could not call them.
"""


import torch

from zo_fx.streams.layout import STREAM_TAG, TWO_PI_F32, check_kind

from ._support import key_words, tl, triton

# Random123 round multipliers and Weyl key increments (same values as zo_fx.streams.philox).
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_INV_2_24 = tl.constexpr(2.0**-24)
#: float32(2 pi), the layout's constant (exactly representable, so no double rounding)
_TWO_PI_F32 = tl.constexpr(float(TWO_PI_F32))

#: the KIND constexpr of every kernel: the stream tag of docs/directions.md
KIND_CODE = dict(STREAM_TAG)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words (tensors or scalars that broadcast); returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # bumped after every round: the bump after the last one is never used
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def load_key(keys_ptr, row):
    """Row ``row`` of a ``key_words`` tensor: (seed lo word, seed hi word, pid) as uint32 scalars."""
    base = keys_ptr + row * 3
    seed_lo = tl.load(base).to(tl.uint32)
    seed_hi = tl.load(base + 1).to(tl.uint32)
    pid = tl.load(base + 2).to(tl.uint32)
    return seed_lo, seed_hi, pid


@triton.jit
def block_words(block, seed_lo, seed_hi, pid, TAG: tl.constexpr):
    """The four Philox words of int64 ``block`` (tensor) of a stream; counter and key as frozen."""
    c0 = block.to(tl.uint32)  # truncation: block mod 2**32
    c1 = (block >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32) + seed_hi
    c3 = tl.full(c0.shape, TAG, tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, seed_lo, pid)


@triton.jit
def _pick_word(index, w0, w1, w2, w3):
    return tl.where(index == 0, w0, tl.where(index == 1, w1, tl.where(index == 2, w2, w3)))


@triton.jit
def _box_muller_uniforms(w_even, w_odd):
    u1 = ((w_even >> 8) + 1).to(tl.float32) * _INV_2_24
    u2 = (w_odd >> 8).to(tl.float32) * _INV_2_24
    return u1, u2


@triton.jit
def rademacher_at(k, seed_lo, seed_hi, pid):
    """+1/-1 (float32) of the int64 element indices ``k``: bit k%32 of word (k%128)//32 of block k//128."""
    w0, w1, w2, w3 = block_words(k >> 7, seed_lo, seed_hi, pid, 0)
    lane = (k & 127).to(tl.uint32)
    word = _pick_word(lane >> 5, w0, w1, w2, w3)
    bit = (word >> (lane & 31)) & 1
    return 1.0 - 2.0 * bit.to(tl.float32)


@triton.jit
def gaussian_uniforms_at(k, seed_lo, seed_hi, pid):
    """Box-Muller inputs (u1, u2) of the int64 element indices ``k`` (pair (k%4)//2 of block k//4)."""
    w0, w1, w2, w3 = block_words(k >> 2, seed_lo, seed_hi, pid, 1)
    second = (k & 2) != 0
    return _box_muller_uniforms(tl.where(second, w2, w0), tl.where(second, w3, w1))


@triton.jit
def gaussian_at(k, seed_lo, seed_hi, pid):
    """Standard normal values (float32) of the int64 element indices ``k``."""
    u1, u2 = gaussian_uniforms_at(k, seed_lo, seed_hi, pid)
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = u2 * _TWO_PI_F32
    return tl.where((k & 1) == 0, r * tl.cos(theta), r * tl.sin(theta))


@triton.jit
def rademacher_rows(row_start, seed_lo, seed_hi, pid, C: tl.constexpr):
    """``[R, C]`` signs of elements ``row_start[r] + c``; every row start a multiple of 32, C of 32.

    One Philox call per 32-bit word (its block is computed 4 times, once per word it
    holds, which keeps the tile two-dimensional), then each word is spread over its 32
    lanes with a broadcast shift and reshaped into element order.
    """
    word_start = row_start[:, None] + 32 * tl.arange(0, C // 32)[None, :].to(tl.int64)  # [R, C/32]
    w0, w1, w2, w3 = block_words(word_start >> 7, seed_lo, seed_hi, pid, 0)
    word = _pick_word((word_start >> 5) & 3, w0, w1, w2, w3)
    shifts = tl.arange(0, 32).to(tl.uint32)
    bits = (word[:, :, None] >> shifts[None, None, :]) & 1  # [R, C/32, 32]
    return tl.reshape(1.0 - 2.0 * bits.to(tl.float32), (row_start.shape[0], C))


@triton.jit
def gaussian_rows(row_start, seed_lo, seed_hi, pid, C: tl.constexpr):
    """``[R, C]`` normals of elements ``row_start[r] + c``; every row start a multiple of 4, C of 4.

    One Philox call and one Box-Muller pair per 4-element block, then the four values
    are interleaved into element order with a broadcast select and a reshape.
    """
    block = (row_start[:, None] >> 2) + tl.arange(0, C // 4)[None, :].to(tl.int64)  # [R, C/4]
    w0, w1, w2, w3 = block_words(block, seed_lo, seed_hi, pid, 1)
    u1a, u2a = _box_muller_uniforms(w0, w1)
    u1b, u2b = _box_muller_uniforms(w2, w3)
    ra = tl.sqrt(-2.0 * tl.log(u1a))
    rb = tl.sqrt(-2.0 * tl.log(u1b))
    ta = u2a * _TWO_PI_F32
    tb = u2b * _TWO_PI_F32
    lane = tl.arange(0, 4)[None, None, :]
    values = _pick_word(
        lane,
        (ra * tl.cos(ta))[:, :, None],
        (ra * tl.sin(ta))[:, :, None],
        (rb * tl.cos(tb))[:, :, None],
        (rb * tl.sin(tb))[:, :, None],
    )  # [R, C/4, 4]
    return tl.reshape(values, (row_start.shape[0], C))


@triton.jit
def direction_at(k, seed_lo, seed_hi, pid, KIND: tl.constexpr):
    """Element-wise values of a stream: KIND 0 Rademacher, 1 Gaussian."""
    if KIND == 0:
        return rademacher_at(k, seed_lo, seed_hi, pid)
    else:
        return gaussian_at(k, seed_lo, seed_hi, pid)


@triton.jit
def direction_tile(
    rows, cols, col0, row_stride, seed_lo, seed_hi, pid, KIND: tl.constexpr, ALIGNED: tl.constexpr
):
    """``[R, C]`` float32 values of elements ``rows[r] * row_stride + cols[c]`` of a stream.

    ``cols`` must be ``col0 + arange(C)``. With ``ALIGNED`` the caller promises the row
    starts ``rows * row_stride + col0`` are multiples of 32 (Rademacher) or 4 (Gaussian)
    and C a multiple of 32 / 4, and the tile is made by ``*_rows`` (see module docstring).
    """
    if ALIGNED:
        row_start = rows.to(tl.int64) * row_stride + col0
        if KIND == 0:
            return rademacher_rows(row_start, seed_lo, seed_hi, pid, cols.shape[0])
        else:
            return gaussian_rows(row_start, seed_lo, seed_hi, pid, cols.shape[0])
    else:
        k = rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :]
        return direction_at(k, seed_lo, seed_hi, pid, KIND)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` to nearest even, as the GPU rounds.

    Triton's interpreter casts float32 to bfloat16 by dropping the low bits (numpy has no
    bfloat16); there we round by hand so that the CPU tests see the GPU's bits.
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def alignment(kind: str) -> int:
    """Row starts and tile widths must be multiples of this for ``direction_tile(ALIGNED=True)``."""
    return 32 if check_kind(kind) == "rademacher" else 4


# --------------------------------------------------------------------------- test launchers
# Thin launchers over the helpers above, with the torch functions' signatures, so the
# tests can hold the Triton bits against zo_fx.streams bit for bit.

_BLOCK = 256


@triton.jit
def _philox_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    c0 = tl.load(counter_ptr + i * 4, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + i * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + i * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + i * 4 + 3, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + i * 2, mask=mask, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + i * 2 + 1, mask=mask, other=0).to(tl.uint32)
    o0, o1, o2, o3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + i * 4, o0.to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 1, o1.to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 2, o2.to(tl.int64), mask=mask)
    tl.store(out_ptr + i * 4 + 3, o3.to(tl.int64), mask=mask)


@triton.jit
def _stream_kernel(keys_ptr, out_ptr, out2_ptr, start, n, WHAT: tl.constexpr, BLOCK: tl.constexpr):
    """WHAT 0: Rademacher signs, 1: Gaussian values, 2: Gaussian uniforms (u1 -> out, u2 -> out2)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    k = start + i.to(tl.int64)
    seed_lo, seed_hi, pid = load_key(keys_ptr, 0)
    if WHAT == 0:
        tl.store(out_ptr + i, rademacher_at(k, seed_lo, seed_hi, pid), mask=mask)
    elif WHAT == 1:
        tl.store(out_ptr + i, gaussian_at(k, seed_lo, seed_hi, pid), mask=mask)
    else:
        u1, u2 = gaussian_uniforms_at(k, seed_lo, seed_hi, pid)
        tl.store(out_ptr + i, u1, mask=mask)
        tl.store(out2_ptr + i, u2, mask=mask)


@triton.jit
def _rows_kernel(keys_ptr, row_start_ptr, out_ptr, KIND: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    seed_lo, seed_hi, pid = load_key(keys_ptr, 0)
    r = tl.arange(0, R)
    cols = tl.arange(0, C)
    starts = tl.load(row_start_ptr + r)
    # rows * 1 + 0 == the row starts themselves
    tile = direction_tile(starts, cols, 0, 1, seed_lo, seed_hi, pid, KIND, True)
    tl.store(out_ptr + r[:, None] * C + cols[None, :], tile)


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def triton_philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 through the Triton helper; same signature and semantics as the torch function."""
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError(f"int64 tensors holding uint32 words expected; got {counter.dtype}, {key.dtype}")
    if counter.shape[-1] != 4 or key.shape[-1] != 2:
        raise ValueError(
            f"counter [..., 4] and key [..., 2] expected; got {tuple(counter.shape)}, {tuple(key.shape)}"
        )
    lead = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c = counter.expand(*lead, 4).reshape(-1, 4).contiguous()
    k = key.expand(*lead, 2).reshape(-1, 2).contiguous()
    out = torch.empty_like(c)
    n = c.shape[0]
    if n:
        _philox_kernel[(triton.cdiv(n, _BLOCK),)](c, k, out, n, BLOCK=_BLOCK)
    return out.reshape(*lead, 4)


def _stream(what: int, seed, pid, start, count, device, out2: bool = False):
    if start < 0 or count < 0:
        raise ValueError(f"element range must be non-negative; got start={start}, count={count}")
    device = _device(device)
    keys = key_words([seed], pid, device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    second = torch.empty_like(out) if out2 else out
    if count:
        grid = (triton.cdiv(count, _BLOCK),)
        _stream_kernel[grid](keys, out, second, start, count, WHAT=what, BLOCK=_BLOCK)
    return (out, second) if out2 else out


def triton_rademacher(seed: int, pid: int, start: int, count: int, *, device=None) -> torch.Tensor:
    """Signs (float32 +1/-1) of elements ``[start, start + count)``, made by the Triton helper."""
    return _stream(0, seed, pid, start, count, device)


def triton_gaussian(seed: int, pid: int, start: int, count: int, *, device=None) -> torch.Tensor:
    """Gaussian values (float32) of elements ``[start, start + count)``, made by the Triton helper."""
    return _stream(1, seed, pid, start, count, device)


def triton_gaussian_uniforms(
    seed: int, pid: int, start: int, count: int, *, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 Box-Muller inputs (u1, u2) behind elements ``[start, start + count)``."""
    return _stream(2, seed, pid, start, count, device, out2=True)


def triton_direction_rows(
    seed: int, pid: int, row_starts, width: int, kind: str, *, device=None
) -> torch.Tensor:
    """``[R, width]`` values at ``row_starts[r] + c``, made by ``direction_tile(ALIGNED=True)``.

    ``R`` and ``width`` must be powers of two, ``width`` and every row start multiples of
    :func:`alignment`; this is the path the GEMM, update and embedding kernels take.
    """
    kind = check_kind(kind)
    step = alignment(kind)
    starts = torch.as_tensor(row_starts, dtype=torch.int64)
    if width % step or bool((starts % step).any()):
        raise ValueError(f"{kind} tiles need row starts and width that are multiples of {step}")
    device = _device(device)
    keys = key_words([seed], pid, device)
    starts = starts.to(device)
    out = torch.empty(starts.numel(), width, dtype=torch.float32, device=device)
    _rows_kernel[(1,)](keys, starts, out, KIND=KIND_CODE[kind], R=starts.numel(), C=width)
    return out
