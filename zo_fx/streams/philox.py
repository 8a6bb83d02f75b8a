"""Philox4x32-10 (Salmon et al., SC'11) written in plain torch integer ops.

Every random number zo_fx uses comes out of this function, so it must give the same
bits on every device and under ``torch.compile``. torch has no uint32 arithmetic that
works everywhere, so words are carried as int64 tensors holding values in [0, 2**32).

The one trap is the 32x32-bit multiply: its 64-bit product does not fit a *signed*
int64. We split the constant multiplier into 16-bit halves so that every partial
product stays below 2**48, and rebuild the high and low words from them.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

# Round multipliers and Weyl key increments from the Random123 reference.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``const * x`` for a 32-bit constant and uint32 words ``x``."""
    c_lo = const & 0xFFFF
    c_hi = const >> 16
    p_lo = x * c_lo  # < 2**48
    t = x * c_hi + (p_lo >> 16)  # < 2**48 + 2**32
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Apply Philox4x32 with 10 rounds.

    Args:
        counter: int64 tensor of shape ``[..., 4]`` holding uint32 values.
        key: int64 tensor of shape ``[..., 2]`` holding uint32 values, broadcastable
            against ``counter``'s leading dimensions.

    Returns:
        int64 tensor of shape ``[..., 4]`` holding the four uint32 output words.
    """
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError(
            f"philox4x32_10 takes int64 tensors holding uint32 words; got counter {counter.dtype}, "
            f"key {key.dtype}. Convert with .to(torch.int64)."
        )
    if counter.shape[-1] != 4 or key.shape[-1] != 2:
        raise ValueError(
            f"counter must have a last dimension of 4 and key of 2; got {tuple(counter.shape)} "
            f"and {tuple(key.shape)}"
        )
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)[:4]
    c0, c1, c2, c3, k0, k1 = _philox_rounds(c0, c1, c2, c3, k0, k1)
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    """The ten rounds on separate word tensors (shared by every caller in this package)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3, k0, k1


def philox_words(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on separate (broadcastable) int64 word tensors; returns the four output words."""
    return _philox_rounds(c0, c1, c2, c3, k0, k1)[:4]
