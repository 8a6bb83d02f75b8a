"""Chunked stream generation in torch ops: what the torch references of every kernel run on.

A pass over a whole parameter (form a perturbed copy, apply an update) walks it in
chunks whose starts are multiples of 128 elements, so every chunk begins on a Philox
block boundary of both streams. Large chunks go through a ``torch.compile``d function
(the Philox words are cheap, the sign expansion is fused into the arithmetic); small
ones stay eager so that tiny test models never pay compile time. Eager and compiled
paths give the same directions bit for bit; they may round the final add differently,
so the choice depends only on the chunk size (deterministic). Set ``ZO_FX_COMPILE=0``
to force eager everywhere.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from zo_fx.streams.layout import block_values, per_block

#: chunk length of the generate-and-apply passes; a multiple of 128 (one Rademacher block)
CHUNK = 1 << 22
#: chunks with at least this many elements use the compiled function
COMPILE_MIN_NUMEL = 1 << 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters accumulate in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compile_enabled() -> bool:
    return os.environ.get("ZO_FX_COMPILE", "1") != "0"


def check_chunk(chunk: int) -> int:
    if chunk <= 0 or chunk % 128:
        raise ValueError(f"a chunk must be a positive multiple of 128 elements; got {chunk}")
    return chunk


def chunk_values(kind: str, n: int, block0, seed_lo, seed_hi, pid, tag, dtype) -> torch.Tensor:
    """``n`` values of one stream from a block-aligned start.

    ``block0`` is the index of the chunk's first block *in units of the kind's block*
    (128 elements for Rademacher, 4 for Gaussian). Key words are tensors, so one
    compiled graph serves every seed and parameter.
    """
    nb = (n + per_block(kind) - 1) // per_block(kind)
    blocks = block0 + torch.arange(nb, dtype=torch.int64, device=seed_lo.device)
    return block_values(kind, blocks, seed_lo, seed_hi, pid, tag).reshape(-1)[:n].to(dtype)


def batched_values(kind: str, n: int, seed_lo, seed_hi, pid, tag, dtype) -> torch.Tensor:
    """[G, n] values of elements 0..n-1 for G seeds (``seed_lo``/``seed_hi`` of shape [G]) in one call."""
    nb = (n + per_block(kind) - 1) // per_block(kind)
    blocks = torch.arange(nb, dtype=torch.int64, device=seed_lo.device)
    values = block_values(kind, blocks, seed_lo.unsqueeze(1), seed_hi.unsqueeze(1), pid, tag)
    return values.reshape(values.shape[0], -1)[:, :n].to(dtype)


@cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def runner(fn, numel: int):
    """``fn`` itself for small chunks, its compiled form from :data:`COMPILE_MIN_NUMEL` elements."""
    if numel >= COMPILE_MIN_NUMEL and compile_enabled():
        return _compiled(fn)
    return fn


def chunk_starts(numel: int, chunk: int):
    """(start, length) of every chunk of a flat tensor of ``numel`` elements."""
    for s in range(0, numel, chunk):
        yield s, min(chunk, numel - s)
