"""Comparison asserts whose failure says what went wrong.

``torch.testing.assert_close`` and a bare ``assert torch.allclose(...)`` say little about
a kernel that is off in a corner of a ragged tile. These say, on failure: both shapes and
dtypes, how many elements are out of bounds, the largest absolute and relative errors
and where they are, and the first few mismatching indices with both values::

    grouped_linear G=7: 12 of 1813 elements outside atol=1e-05 + rtol=1e-05*|expected|
      actual (7, 5, 3, 37) torch.float32 cpu, expected (7, 5, 3, 37) torch.float32 cpu
      max abs error 3.05e-03 at (6, 4, 2, 36); max rel error 1.20e-02 at (6, 4, 2, 36)
      first mismatches (index: actual vs expected, abs error, allowed):
        (6, 0, 0, 32): 0.4121 vs 0.4123 (2.0e-04 > 1.4e-05)

Every helper checks shape, dtype and device first (as ``torch.testing.assert_close``
does). NaN never equals anything, NaN included; equal infinities are equal.
"""

from __future__ import annotations

import torch

#: mismatching elements listed in a failure message
SHOWN = 5


def _label(what: str) -> str:
    return f"{what}: " if what else ""


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} {t.device}"


def _check_like(actual, expected, what: str) -> None:
    for name, t in (("actual", actual), ("expected", expected)):
        if not isinstance(t, torch.Tensor):
            raise AssertionError(f"{_label(what)}{name} is a {type(t).__name__}, not a tensor")
    if actual.shape != expected.shape or actual.dtype != expected.dtype or actual.device != expected.device:
        raise AssertionError(
            f"{_label(what)}tensors differ in shape, dtype or device: "
            f"actual {_describe(actual)}, expected {_describe(expected)}"
        )


def _index(flat: int, shape) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def _fmt(t: torch.Tensor, i: int) -> str:
    """Element ``i`` of flat ``t`` as written in full: every digit of an integer, enough to round-trip a float."""
    value = t[i].item()
    if not t.dtype.is_floating_point:
        return str(value)
    return f"{value:.{17 if t.dtype == torch.float64 else 9}g}"


def _fail(actual, expected, bad, what: str, criterion: str, allowed=None):
    """Raise the AssertionError that describes where ``bad`` (a bool tensor like actual) holds."""
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    bad = bad.detach().cpu().reshape(-1)
    if actual.dtype.is_floating_point:
        abs_err = (a - e).abs()
    else:  # exact difference of integers (Philox words are beyond float64's 53 bits)
        abs_err = (actual.detach().cpu().long() - expected.detach().cpu().long()).reshape(-1).abs().double()
    zero = torch.zeros_like(abs_err)
    same = (actual.detach().cpu() == expected.detach().cpu()).reshape(-1)
    abs_err = torch.where(same, zero, abs_err)  # equal infinities: no error
    rel_err = torch.where(abs_err == 0, zero, abs_err / e.abs())  # inf where expected is 0 and actual is not
    nans = torch.isnan(abs_err)
    shape = tuple(actual.shape)
    lines = [
        f"{_label(what)}{int(bad.sum())} of {bad.numel()} elements {criterion}",
        f"  actual {_describe(actual)}, expected {_describe(expected)}",
    ]
    if bool((~nans).any()):  # the largest errors among the elements that are not NaN on either side
        i_abs = int(torch.where(nans, -1.0, abs_err).argmax())
        i_rel = int(torch.where(nans, -1.0, rel_err).argmax())
        lines.append(
            f"  max abs error {abs_err[i_abs].item():.3e} at {_index(i_abs, shape)}; "
            f"max rel error {rel_err[i_rel].item():.3e} at {_index(i_rel, shape)}"
        )
    if bool(nans.any()):
        first = _index(int(nans.nonzero()[0]), shape)
        lines.append(f"  {int(nans.sum())} element(s) NaN in actual or expected, the first at {first}")
    if allowed is not None:
        allowed = torch.as_tensor(allowed, dtype=torch.float64).cpu().broadcast_to(actual.shape).reshape(-1)
    header = "index: actual vs expected, abs error" + (", allowed" if allowed is not None else "")
    lines.append(f"  first mismatches ({header}):")
    flat_actual, flat_expected = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    for i in bad.nonzero().flatten()[:SHOWN].tolist():
        bound = f" > {allowed[i].item():.1e}" if allowed is not None else ""
        lines.append(
            f"    {_index(i, shape)}: {_fmt(flat_actual, i)} vs {_fmt(flat_expected, i)} "
            f"({abs_err[i].item():.1e}{bound})"
        )
    raise AssertionError("\n".join(lines))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, allowed, *, what: str = "") -> None:
    """``|actual - expected| <= allowed`` elementwise; ``allowed`` a number or a tensor broadcastable to both."""
    _check_like(actual, expected, what)
    a, e = actual.detach().double(), expected.detach().double()
    bound = torch.as_tensor(allowed, dtype=torch.float64, device=a.device)
    ok = (a == e) | ((a - e).abs() <= bound)
    if not bool(ok.all()):
        _fail(actual, expected, ~ok, what, "outside the allowed elementwise error", bound)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise (``torch.testing.assert_close``'s rule)."""
    _check_like(actual, expected, what)
    a, e = actual.detach().double(), expected.detach().double()
    bound = atol + rtol * e.abs()
    ok = (a == e) | ((a - e).abs() <= bound)
    if not bool(ok.all()):
        _fail(actual, expected, ~ok, what, f"outside atol={atol:g} + rtol={rtol:g}*|expected|", bound)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, *, what: str = "") -> None:
    """Every element within relative error ``rel``: ``|actual - expected| <= rel * |expected|``.

    For float64 results that must agree to round-off (an exact zero must then be exactly zero).
    """
    _check_like(actual, expected, what)
    a, e = actual.detach().double(), expected.detach().double()
    bound = rel * e.abs()
    ok = (a == e) | ((a - e).abs() <= bound)
    if not bool(ok.all()):
        _fail(actual, expected, ~ok, what, f"beyond relative error {rel:g}", bound)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "") -> None:
    """Equal values (``torch.equal``: -0.0 equals 0.0), with the mismatches listed on failure."""
    _check_like(actual, expected, what)
    if not torch.equal(actual, expected):
        _fail(actual, expected, actual != expected, what, "differ")


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "") -> None:
    """The same bits in every element (-0.0 is not 0.0, a NaN equals the same NaN): "left unchanged"."""
    _check_like(actual, expected, what)
    a, e = _bits(actual.detach().contiguous()), _bits(expected.detach().contiguous())
    if not torch.equal(a, e):
        _fail(actual, expected, a != e, what, "differ in their bits")


__all__ = ["assert_bitwise_equal", "assert_close", "assert_equal", "assert_rel_close", "assert_within"]
