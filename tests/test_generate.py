"""Generate-and-apply passes: perturbed copies and the fused multi-direction update."""

import pytest
import torch

from zo_fx.kernels import _chunks as C
from zo_fx.kernels import perturb as G
from zo_fx.kernels import update as U
from zo_fx.streams import layout as D

KINDS = ["rademacher", "gaussian"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_perturbed_is_base_plus_scaled_direction_and_leaves_base_alone(kind, dtype):
    base = torch.randn(37, 129, dtype=dtype)
    before = base.clone()
    out = G.perturbed(base, 5, 77, -0.25, kind)
    expected = base + (-0.25) * D.direction(5, 77, base.shape, kind, dtype=dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15 if dtype == torch.float64 else 1e-6)
    assert torch.equal(base, before)


def test_perturbed_in_half_precision_rounds_once_from_float32():
    base = torch.randn(1000).to(torch.bfloat16)
    out = G.perturbed(base, 1, 2, 1e-3, "rademacher")
    expected = (base.float() + 1e-3 * D.rademacher(1, 2, 0, 1000)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_update_equals_naive_per_direction_reference_float64(kind):
    p = torch.randn(3, 1000, dtype=torch.float64)
    p0 = p.clone()
    seeds, coefs = [3, 1 << 40, 17, 99], [0.3, -1.7, 2.5, 1e-3]
    U.fused_update_reference_(p, seeds, coefs, 1234, kind, lr=0.05, weight_decay=0.1, chunk=384)
    naive = p0.clone()
    step = sum(c * D.direction(s, 1234, p0.shape, kind, dtype=torch.float64) for s, c in zip(seeds, coefs))
    naive -= 0.05 * (step + 0.1 * p0)
    torch.testing.assert_close(p, naive, rtol=1e-13, atol=1e-15)


def test_update_with_zero_lr_leaves_weights_bit_identical():
    p = torch.randn(5000)
    p0 = p.clone()
    U.fused_update_reference_(p, [1, 2], [3.0, -4.0], 5, "gaussian", lr=0.0, weight_decay=0.1)
    assert torch.equal(p, p0)


def test_compiled_path_gives_the_eager_signs(monkeypatch):
    """Above COMPILE_MIN_NUMEL the kernel is compiled; its signs equal the eager stream bit for bit."""
    n = C.COMPILE_MIN_NUMEL + 300
    base = torch.zeros(n)
    u = G.perturbed(base, 2**35 + 1, 4, 1.0, "rademacher")
    assert torch.equal(u, D.rademacher(2**35 + 1, 4, 0, n))
    monkeypatch.setenv("ZO_FX_COMPILE", "0")
    assert torch.equal(G.perturbed(base, 2**35 + 1, 4, 1.0, "rademacher"), u)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 128"):
        U.fused_update_reference_(torch.zeros(10), [1], [1.0], 1, "rademacher", lr=1.0, chunk=100)
    with pytest.raises(ValueError, match="seeds but"):
        U.fused_update_reference_(torch.zeros(10), [1, 2], [1.0], 1, "rademacher", lr=1.0)
    with pytest.raises(ValueError, match="block-aligned"):
        G.perturbed(torch.zeros(10), 1, 1, 1.0, "rademacher", start=3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("numel", [1, 5, 576, 1000])
def test_batched_small_copies_equal_one_call_per_group(kind, numel):
    base = torch.randn(numel, dtype=torch.float64)
    seeds, scales = [3, 2**50 + 7, 11, 0], [1e-3, -2e-3, 0.0, 0.5]
    got = G.perturbed_groups(base, seeds, 99, scales, kind)
    for g, (seed, scale) in enumerate(zip(seeds, scales)):
        expected = base if scale == 0.0 else G.perturbed(base, seed, 99, scale, kind)
        assert torch.equal(got[g], expected)
