"""Checked numbers: a setting is a finite number in range, or a clear error naming it.

The group table and every optimizer config take their numbers through these, so a NaN
learning rate, a float seed or an eps of 0 is refused where it enters, never rounded
or carried into the weights.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_real(value, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_tensor: bool = False) -> float:
    """``value`` as a finite float in the given range, or an error naming ``name``."""
    if allow_tensor and isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {out}")
    if low is not None and (out < low or (low_open and out == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}; got {out}")
    if high is not None and (out > high or (high_open and out == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {out}")
    return out


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in the given range; floats (even 2.0) and bools are refused, never rounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be an integer in {bounds}; got {out}")
    return out
