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
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable

import torch

from .philox import MASK32, philox_words

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
KINDS = (RADEMACHER, GAUSSIAN)
STREAM_TAG = {RADEMACHER: 0, GAUSSIAN: 1}
ELEMENTS_PER_BLOCK = {RADEMACHER: 128, GAUSSIAN: 4}
TWO_PI_F32 = torch.tensor(2 * math.pi, dtype=torch.float32).item()
INV_2_24 = 2.0**-24
MAX_SEED = 2**64 - 1


class ParamIdCollisionError(ValueError):
    """Two parameter names hash to the same 32-bit stream id."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown direction kind {kind!r}; use one of {KINDS}")
    return kind


def check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a direction seed must be an integer in [0, 2**64); got {seed}")
    return seed


def stable_param_id(name: str) -> int:
    """32-bit stream id of a parameter: the first 4 bytes (little endian) of BLAKE2b-64(name)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little")


def assign_param_ids(names: Iterable[str]) -> dict[str, int]:
    """Stable ids for a set of parameter names; raises ``ParamIdCollisionError`` on a collision."""
    ids: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name in names:
        pid = stable_param_id(name)
        if pid in owner and owner[pid] != name:
            raise ParamIdCollisionError(
                f"parameters {owner[pid]!r} and {name!r} share the stream id {pid:#010x}; "
                "rename one of them (ids derive from the parameter name) so their directions differ"
            )
        owner[pid] = name
        ids[name] = pid
    return ids


def _key_words(seed: int, pid: int, stream: int, device) -> tuple[torch.Tensor, ...]:
    seed = check_seed(seed)
    mk = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return mk(seed & MASK32), mk((seed >> 32) & MASK32), mk(int(pid) & MASK32), mk(stream)


def block_words(seed: int, pid: int, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The four Philox output words (int64 [n, 4]) of the given blocks of a stream."""
    k0, seed_hi, k1, tag = _key_words(seed, pid, STREAM_TAG[check_kind(kind)], blocks.device)
    w = philox_words(blocks & MASK32, blocks >> 32, seed_hi, tag, k0, k1)
    return torch.stack(torch.broadcast_tensors(*w), dim=-1)


def _signs_from_words(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, 4] words -> [n * 128] signs in element order (word-major, LSB first)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return (1 - 2 * bits).reshape(-1).to(dtype)


def _box_muller(w_even: torch.Tensor, w_odd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = ((w_even >> 8) + 1).to(torch.float32) * INV_2_24
    u2 = (w_odd >> 8).to(torch.float32) * INV_2_24
    return u1, u2


def _gaussians_from_words(words: torch.Tensor) -> torch.Tensor:
    """[n, 4] words -> [n * 4] float32 normals in element order."""
    u1, u2 = _box_muller(words[:, 0::2], words[:, 1::2])  # [n, 2] each: pair j
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * TWO_PI_F32
    return torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1).reshape(-1)


def _range_blocks(start: int, count: int, per_block: int, device) -> tuple[torch.Tensor, int]:
    first = start // per_block
    last = (start + count - 1) // per_block
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    return blocks, start - first * per_block


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"element range must be non-negative; got start={start}, count={count}")


def rademacher(seed, pid, start, count, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Signs (+1/-1) of elements ``[start, start + count)`` of a Rademacher stream."""
    _check_range(start, count)
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    blocks, skip = _range_blocks(start, count, 128, device)
    return _signs_from_words(block_words(seed, pid, blocks, RADEMACHER), dtype)[skip : skip + count]


def gaussian(seed, pid, start, count, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal values of elements ``[start, start + count)`` of a Gaussian stream."""
    _check_range(start, count)
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    blocks, skip = _range_blocks(start, count, 4, device)
    return _gaussians_from_words(block_words(seed, pid, blocks, GAUSSIAN))[skip : skip + count].to(dtype)


def gaussian_uniforms(seed, pid, start, count, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 Box-Muller inputs (u1, u2) behind elements ``[start, start + count)``."""
    _check_range(start, count)
    blocks, skip = _range_blocks(start, count, 4, device)
    words = block_words(seed, pid, blocks, GAUSSIAN)
    u1, u2 = _box_muller(words[:, 0::2], words[:, 1::2])
    # element 4b + 2j + s uses pair j of block b, whatever s is
    u1 = u1.repeat_interleave(2, dim=1).reshape(-1)[skip : skip + count]
    u2 = u2.repeat_interleave(2, dim=1).reshape(-1)[skip : skip + count]
    return u1, u2


def sample(seed, pid, start, count, kind, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the ``kind`` stream of (seed, pid)."""
    fn = rademacher if check_kind(kind) == RADEMACHER else gaussian
    return fn(seed, pid, start, count, dtype=dtype, device=device)


def sample_at(seed, pid, index: torch.Tensor, kind, *, dtype=torch.float32) -> torch.Tensor:
    """Elements at arbitrary flat indices (any shape, int64); only their blocks are generated."""
    per_block = ELEMENTS_PER_BLOCK[check_kind(kind)]
    index = index.to(torch.int64)
    flat = index.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(index.shape, dtype=dtype, device=index.device)
    blocks, inverse = torch.unique(flat // per_block, return_inverse=True)
    words = block_words(seed, pid, blocks, kind)
    if kind == RADEMACHER:
        lane = flat % 128
        word = words[inverse, lane // 32]
        bit = (word >> (lane % 32)) & 1
        out = (1 - 2 * bit).to(dtype)
    else:
        values = _gaussians_from_words(words).view(-1, 4)
        out = values[inverse, flat % 4].to(dtype)
    return out.view(index.shape)


def direction(seed, pid, shape, kind, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """A whole parameter's direction, shaped like the parameter (row-major element order)."""
    shape = torch.Size(shape)
    return sample(seed, pid, 0, shape.numel(), kind, dtype=dtype, device=device).view(shape)
