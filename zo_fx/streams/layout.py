"""Direction streams: element k of parameter ``pid`` in direction ``seed``, random access.

This module is the contract every other part of zo_fx shares (the graph ops, the
fused update, the Triton kernels, saved trajectories). Its bit layout is written down
in ``docs/directions.md`` and is frozen:

* Philox4x32-10 key    = (seed mod 2**32, pid)
* Philox4x32-10 counter = (block mod 2**32, block div 2**32, seed div 2**32, stream)
  with ``stream`` 0 for Rademacher signs and 1 for Gaussian values.
* Rademacher: element k lives in block k // 128; inside the block it is bit (k % 32)
  of output word (k % 128) // 32. Bit 0 gives +1, bit 1 gives -1.
* Gaussian: element k lives in block k // 4; words (0, 1) feed elements 4b, 4b+1 and
  words (2, 3) feed 4b+2, 4b+3 through Box-Muller in float32:
  u1 = ((w_even >> 8) + 1) * 2**-24 in (0, 1],  u2 = (w_odd >> 8) * 2**-24 in [0, 1),
  r = sqrt(-2 ln u1), element 4b+2j = r cos(2 pi u2), element 4b+2j+1 = r sin(2 pi u2).

A value never depends on the dtype asked for (values are made in float32 and then
cast), the device, the chunking, or on which other parameters exist.

Everything that turns (seed, pid, block) into values lives here exactly once: the key
packing (:func:`seed_words`, :func:`key_tensors`), the Philox call on block counters
(:func:`philox_block_words`), the sign expansion (:func:`signs_from_words`) and
Box-Muller (:func:`box_muller_uniforms`, :func:`normals_from_words`). The chunked
generators in :mod:`zo_fx.kernels` and the Triton kernels' key tensors are built on them.
"""

from __future__ import annotations

import math
import numbers

import torch

from .philox import MASK32, philox_words

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
#: the element-wise kinds: every element of a parameter drawn from one stream
KINDS = (RADEMACHER, GAUSSIAN)
STREAM_TAG = {RADEMACHER: 0, GAUSSIAN: 1}
#: low-rank directions (``"lowrank:r"``): a matrix parameter's direction is ``A B^T / sqrt(r)``, the factors'
#: signs drawn from the streams of these tags (zo_fx.kernels.lowrank); other parameters use Rademacher
LOWRANK = "lowrank"
LOWRANK_FACTOR_TAGS = (2, 3)
#: suffix of the lazy low-rank kind (``"lowrank:r:lazy"``, LOZO): factor B is drawn from the seed with its low
#: 32 bits cleared, so seeds that share their high bits share B while A follows the whole seed
LAZY = "lazy"
B_SEED_MASK = ~0xFFFFFFFF & (2**64 - 1)
MAX_RANK = 256
ELEMENTS_PER_BLOCK = {RADEMACHER: 128, GAUSSIAN: 4}
TWO_PI_F32 = torch.tensor(2 * math.pi, dtype=torch.float32).item()
INV_2_24 = 2.0**-24
MAX_SEED = 2**64 - 1


# ---- checked inputs ---------------------------------------------------------------------------------


def check_kind(kind: str) -> str:
    """An element-wise kind (``"rademacher"``, ``"gaussian"``): what the stream generators take.

    A low-rank kind never reaches them: the entry points that take a whole parameter resolve it
    first (:func:`element_kind`, :mod:`zo_fx.kernels.lowrank`), so a path that would treat a
    low-rank matrix element by element fails here instead of using another direction.
    """
    if kind not in KINDS:
        if is_lowrank(kind):
            raise ValueError(f"direction kind {kind!r} reached an element-wise generator; low-rank directions "
                             "of a matrix are made from their factors (zo_fx.kernels.lowrank)")
        raise ValueError(f"unknown direction kind {kind!r}; use one of {KINDS}, or 'lowrank:<rank>'")
    return kind


def lowrank_kind(rank: int, lazy: bool = False) -> str:
    """The kind string of rank-``rank`` low-rank directions: ``"lowrank:<rank>"`` (``"lowrank:<rank>:lazy"``)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= int(rank) <= MAX_RANK:
        raise ValueError(f"a low-rank direction's rank must be an integer in [1, {MAX_RANK}]; got {rank!r}")
    return f"{LOWRANK}:{int(rank)}" + (f":{LAZY}" if lazy else "")


def is_lowrank(kind) -> bool:
    return isinstance(kind, str) and kind.startswith(LOWRANK + ":")


def _lowrank_parts(kind: str) -> tuple[int, bool]:
    if not is_lowrank(kind):
        raise ValueError(f"{kind!r} is not a low-rank kind ('lowrank:<rank>' or 'lowrank:<rank>:lazy')")
    parts = kind.split(":")
    if len(parts) > 3 or not parts[1].isdigit() or (len(parts) == 3 and parts[2] != LAZY):
        raise ValueError(f"direction kind {kind!r}: the rank must be an integer: write 'lowrank:<rank>' or "
                         "'lowrank:<rank>:lazy'")
    lowrank_kind(int(parts[1]))  # the rank's range
    return int(parts[1]), len(parts) == 3


def rank_of(kind: str) -> int:
    """The rank of a low-rank kind (``"lowrank:4"`` -> 4)."""
    return _lowrank_parts(kind)[0]


def is_lazy(kind) -> bool:
    """Whether a kind is the lazy low-rank kind (factor B shared by seeds with the same high 32 bits)."""
    return is_lowrank(kind) and _lowrank_parts(kind)[1]


def b_factor_seed(seed: int, lazy: bool) -> int:
    """The seed factor B is drawn from: the seed itself, or (lazy) the seed with its low 32 bits cleared."""
    return int(seed) & B_SEED_MASK if lazy else int(seed)


def check_direction_kind(kind: str, rank: int | None = None) -> str:
    """Any direction kind, canonical: ``"rademacher"``, ``"gaussian"``, ``"lowrank:<rank>"`` or
    ``"lowrank:<rank>:lazy"``.

    ``kind="lowrank"`` takes its rank from ``rank`` (default 1); ``"lowrank:r"`` must agree with ``rank``
    when both are given.
    """
    if kind == LOWRANK:
        return lowrank_kind(1 if rank is None else rank)
    if is_lowrank(kind):
        r, lazy = _lowrank_parts(kind)
        if rank is not None and rank != r:
            raise ValueError(f"direction kind {kind!r} has rank {r}, but rank={rank} was given")
        return lowrank_kind(r, lazy)
    if rank is not None:
        raise ValueError(f"rank={rank} is for low-rank directions; kind {kind!r} has none (use kind='lowrank')")
    return check_kind(kind)


def element_kind(kind: str) -> str:
    """The element-wise kind a parameter that is not a matrix uses under ``kind`` (Rademacher for low-rank)."""
    return RADEMACHER if is_lowrank(check_direction_kind(kind)) else kind


def check_seed(seed) -> int:
    """A seed as a Python int in ``[0, 2**64)``; floats, bools and strings are refused, never rounded."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
            seed = seed.item()
        else:
            raise TypeError(f"a direction seed must be an integer; got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a direction seed must be an integer in [0, 2**64); got {seed}")
    return seed


def check_pid(pid) -> int:
    pid = int(pid)
    if not 0 <= pid <= MASK32:
        raise ValueError(f"a parameter stream id must be in [0, 2**32); got {pid}")
    return pid


def per_block(kind: str) -> int:
    """Elements one Philox call gives: 128 signs or 4 normals."""
    return ELEMENTS_PER_BLOCK[check_kind(kind)]


# ---- key packing ------------------------------------------------------------------------------------


def seed_words(seed) -> tuple[int, int]:
    """(seed mod 2**32, seed div 2**32): key word 0 and counter word 2 of every Philox call."""
    seed = check_seed(seed)
    return seed & MASK32, seed >> 32


def key_tensors(seeds, pid, kind: str, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 tensors (seed lo words [G], seed hi words [G], pid [], stream tag []) for G seeds.

    Tensor-valued keys let one compiled generator serve every seed and parameter.
    """
    words = [seed_words(s) for s in seeds]
    lo = torch.tensor([w[0] for w in words], dtype=torch.int64, device=device)
    hi = torch.tensor([w[1] for w in words], dtype=torch.int64, device=device)
    pid_t = torch.tensor(check_pid(pid), dtype=torch.int64, device=device)
    tag = torch.tensor(STREAM_TAG[check_kind(kind)], dtype=torch.int64, device=device)
    return lo, hi, pid_t, tag


# ---- from counters to values --------------------------------------------------------------------------


def philox_block_words(blocks, seed_lo, seed_hi, pid, tag) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox on the given block counters (all inputs broadcast)."""
    return torch.broadcast_tensors(*philox_words(blocks & MASK32, blocks >> 32, seed_hi, tag, seed_lo, pid))


def _bits(words: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [..., 128] int32 bits in element order (word-major, bit 0 first)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)


def signs_from_words(words: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [..., 128] int32 signs in element order (word-major, bit 0 first)."""
    return 1 - 2 * _bits(words)


def sign_bits_from_words(words: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [..., 128] bool, True where the sign is -1 (element order as above).

    ``where(bit, x - s, x + s)`` is ``x + s * sign`` rounded the same way, without the
    multiply: the perturbation kernels use it.
    """
    return _bits(words).bool()


def sign_at(words: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """The sign of lane ``lane`` (0..127) of a block whose words are ``words`` ([..., 4])."""
    word = torch.gather(words, -1, (lane // 32).unsqueeze(-1)).squeeze(-1)
    return 1 - 2 * ((word >> (lane % 32)) & 1)


def box_muller_uniforms(w_even: torch.Tensor, w_odd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 Box-Muller inputs: u1 in (0, 1] from the even word, u2 in [0, 1) from the odd one."""
    u1 = ((w_even >> 8) + 1).to(torch.float32) * INV_2_24
    u2 = (w_odd >> 8).to(torch.float32) * INV_2_24
    return u1, u2


#: words -> normals from a faster implementation of the same Box-Muller, or None where it cannot run
_normals_provider = None


def register_normals_provider(provider) -> None:
    """Route :func:`normals_from_columns` through ``provider(w0, w1, w2, w3)`` first (None: torch's ops run).

    zo_fx.kernels.native registers its kernel here when it is imported (the package's import does
    that), so that the kernels' Gaussian values and every eager torch path's agree bit for bit; the
    streams layer itself depends on nothing above it.
    """
    global _normals_provider
    _normals_provider = provider


#: (seeds, pid, tag, count, dtype) -> ``[G, count]`` Rademacher signs of a stream from element 0, or None
_signs_provider = None


def register_signs_provider(provider) -> None:
    """Route :func:`factor_signs` through ``provider`` first (None: torch's ops run).

    Rademacher signs are exact, so a provider changes speed only: it must give the same values
    (the native kernel's are bit-identical, tested).
    """
    global _signs_provider
    _signs_provider = provider


def normals_from_words(words: torch.Tensor) -> torch.Tensor:
    """[..., 4] words -> [..., 4] float32 normals: pair q of words gives (r cos, r sin)."""
    return normals_from_columns(*words.unbind(-1))


def normals_from_columns(w0, w1, w2, w3) -> torch.Tensor:
    """The four words of each block as separate tensors -> ``[..., 4]`` float32 normals.

    Box-Muller runs on whole word columns and the four outputs are stacked once at the
    end: under ``torch.compile`` this is one contiguous vectorised loop, about 5x faster on
    CPU than Box-Muller on the stacked words' strided pairs, and element by element the
    same float32 operations.

    Eager on CPU, the native kernel's Box-Muller runs instead when it is built (the same
    float32 steps; its log/cos/sin within a few ulps of torch's, docs/native.md), so that
    every CPU path gives the values the native tiles and updates use: see
    :func:`register_normals_provider`.
    """
    if _normals_provider is not None:
        values = _normals_provider(w0, w1, w2, w3)
        if values is not None:
            return values
    values = []
    for even, odd in ((w0, w1), (w2, w3)):
        u1, u2 = box_muller_uniforms(even, odd)
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = u2 * TWO_PI_F32
        values += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(values, dim=-1)


def block_values(kind: str, blocks, seed_lo, seed_hi, pid, tag) -> torch.Tensor:
    """Values of whole blocks, shape ``[*broadcast dims, per_block(kind)]`` (int32 signs or float32 normals)."""
    words = philox_block_words(blocks, seed_lo, seed_hi, pid, tag)
    return signs_from_words(torch.stack(words, dim=-1)) if kind == RADEMACHER else normals_from_columns(*words)


# ---- random access by (seed, pid, element range) ---------------------------------------------------------


def block_words(seed: int, pid: int, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The four Philox output words (int64 [n, 4]) of the given blocks of a stream."""
    lo, hi, pid_t, tag = key_tensors([seed], pid, kind, blocks.device)
    return torch.stack(philox_block_words(blocks, lo[0], hi[0], pid_t, tag), dim=-1)


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"element range must be non-negative; got start={start}, count={count}")


def _range_words(seed, pid, start: int, count: int, kind: str, device) -> tuple[torch.Tensor, int]:
    """Words of the blocks covering ``[start, start + count)`` and the offset of ``start`` in the first one."""
    n = per_block(kind)
    first, last = start // n, (start + count - 1) // n
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    return block_words(seed, pid, blocks, kind), start - first * n


def sample(seed, pid, start, count, kind, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the ``kind`` stream of (seed, pid)."""
    kind = check_kind(kind)
    _check_range(start, count)
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    words, skip = _range_words(seed, pid, start, count, kind, device)
    values = signs_from_words(words) if kind == RADEMACHER else normals_from_words(words)
    return values.reshape(-1)[skip : skip + count].to(dtype)


def rademacher(seed, pid, start, count, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Signs (+1/-1) of elements ``[start, start + count)`` of a Rademacher stream."""
    return sample(seed, pid, start, count, RADEMACHER, dtype=dtype, device=device)


def gaussian(seed, pid, start, count, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal values of elements ``[start, start + count)`` of a Gaussian stream."""
    return sample(seed, pid, start, count, GAUSSIAN, dtype=dtype, device=device)


def gaussian_uniforms(seed, pid, start, count, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 Box-Muller inputs (u1, u2) behind elements ``[start, start + count)``."""
    _check_range(start, count)
    words, skip = _range_words(seed, pid, start, count, GAUSSIAN, device)
    u1, u2 = box_muller_uniforms(words[:, 0::2], words[:, 1::2])
    # element 4b + 2j + s uses pair j of block b, whatever s is
    u1 = u1.repeat_interleave(2, dim=1).reshape(-1)[skip : skip + count]
    u2 = u2.repeat_interleave(2, dim=1).reshape(-1)[skip : skip + count]
    return u1, u2


def sample_at(seed, pid, index: torch.Tensor, kind, *, dtype=torch.float32) -> torch.Tensor:
    """Elements at arbitrary flat indices (any shape, int64); only their blocks are generated."""
    n = per_block(kind)
    index = index.to(torch.int64)
    flat = index.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(index.shape, dtype=dtype, device=index.device)
    blocks, inverse = torch.unique(flat // n, return_inverse=True)
    words = block_words(seed, pid, blocks, kind)
    if kind == RADEMACHER:
        out = sign_at(words[inverse], flat % 128).to(dtype)
    else:
        out = normals_from_words(words)[inverse, flat % 4].to(dtype)
    return out.view(index.shape)


def factor_signs(seeds, pid, count: int, factor: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[G, count]`` signs of low-rank factor ``factor`` (0: A, 1: B) of parameter ``pid``, one row per seed.

    Element ``i * r + t`` is entry ``(i, t)`` of the factor (row-major ``[rows, r]``); the signs are the
    Rademacher expansion of the Philox stream whose tag is ``LOWRANK_FACTOR_TAGS[factor]``. On CPU a
    registered signs provider (the native kernel) makes them in one call: a few hundred torch ops per
    matrix otherwise, which at small matrices cost more than the step's GEMMs on them.
    """
    if _signs_provider is not None and (device is None or torch.device(device).type == "cpu"):
        made = _signs_provider(list(seeds), check_pid(pid), LOWRANK_FACTOR_TAGS[factor], count, dtype)
        if made is not None:
            return made
    words = [seed_words(s) for s in seeds]
    lo = torch.tensor([w[0] for w in words], dtype=torch.int64, device=device).unsqueeze(1)
    hi = torch.tensor([w[1] for w in words], dtype=torch.int64, device=device).unsqueeze(1)
    pid_t = torch.tensor(check_pid(pid), dtype=torch.int64, device=device)
    tag = torch.tensor(LOWRANK_FACTOR_TAGS[factor], dtype=torch.int64, device=device)
    blocks = torch.arange((count + 127) // 128, dtype=torch.int64, device=device)
    values = block_values(RADEMACHER, blocks, lo, hi, pid_t, tag)
    return values.reshape(len(words), -1)[:, :count].to(dtype)


def direction(seed, pid, shape, kind, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """A whole parameter's direction, shaped like the parameter (row-major element order).

    Under a low-rank kind a matrix (2-D) parameter's direction is ``A B^T / sqrt(r)``
    (:func:`lowrank_direction`) and any other parameter's is the Rademacher stream.
    """
    shape = torch.Size(shape)
    if is_lowrank(kind) and len(shape) == 2:
        return lowrank_direction(seed, pid, shape, rank_of(kind), dtype=dtype, device=device, lazy=is_lazy(kind))
    return sample(seed, pid, 0, shape.numel(), element_kind(kind), dtype=dtype, device=device).view(shape)


def lowrank_factors(seeds, pid, shape, rank: int, *, dtype=torch.float32, device=None, lazy: bool = False):
    """``(A [G, m, r], B [G, n, r])``: the sign factors of the low-rank directions of an ``[m, n]`` matrix.

    ``lazy``: B from :func:`b_factor_seed` of each seed (the lazy kind), A from the seed itself.
    """
    m, n = shape
    a = factor_signs(seeds, pid, m * rank, 0, dtype=dtype, device=device).view(len(seeds), m, rank)
    b_seeds = [b_factor_seed(s, lazy) for s in seeds]
    b = factor_signs(b_seeds, pid, n * rank, 1, dtype=dtype, device=device).view(len(seeds), n, rank)
    return a, b


def inv_sqrt_rank(rank: int) -> float:
    """``1 / sqrt(r)``, the factor that gives every element of ``A B^T / sqrt(r)`` unit variance."""
    return 1.0 / math.sqrt(rank)


def lowrank_direction(seed, pid, shape, rank: int, *, dtype=torch.float32, device=None,
                      lazy: bool = False) -> torch.Tensor:
    """The dense ``A B^T / sqrt(r)`` of one seed: for tests and inspection; a step never forms it whole."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = lowrank_factors([seed], pid, shape, rank, dtype=acc, device=device, lazy=lazy)
    return ((a[0] @ b[0].t()) * inv_sqrt_rank(rank)).to(dtype)
