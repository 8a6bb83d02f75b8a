"""Direction streams: random access, independence from chunking/dtype/device, statistics."""

import math
import random

import pytest
import torch

from zo_fx.kernels import update as U
from zo_fx.streams import ids as I
from zo_fx.streams import layout as D

KINDS = ["rademacher", "gaussian"]


def _fresh_seeds(n, rng=None):
    rng = rng or random.Random()
    return [rng.randrange(2**64) for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_any_slice_equals_the_same_slice_of_the_whole_stream(kind):
    rng = random.Random()
    for seed in _fresh_seeds(3, rng):
        pid = rng.randrange(2**32)
        whole = D.sample(seed, pid, 0, 5000, kind)
        for _ in range(60):
            start = rng.randrange(0, 4990)
            count = rng.randrange(1, 5000 - start)
            part = D.sample(seed, pid, start, count, kind)
            assert torch.equal(part, whole[start : start + count]), (seed, pid, start, count)


@pytest.mark.parametrize("kind", KINDS)
def test_slices_that_cut_a_block(kind):
    seed, pid = 12345, 678
    whole = D.sample(seed, pid, 0, 1024, kind)
    for start, count in [(127, 2), (1, 126), (3, 2), (129, 500), (255, 1), (2, 1)]:
        assert torch.equal(D.sample(seed, pid, start, count, kind), whole[start : start + count])


@pytest.mark.parametrize("kind", KINDS)
def test_far_offsets_are_random_access(kind):
    """A block past 2**32 (counter's high word in use) is generated without the ones before it."""
    start = 2**32 * 128 + 77
    a = D.sample(7, 9, start, 300, kind)
    b = D.sample(7, 9, start + 100, 200, kind)
    assert torch.equal(a[100:], b)
    assert not torch.equal(a[:128], D.sample(7, 9, 77, 128, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_at_arbitrary_indices(kind):
    whole = D.sample(99, 5, 0, 4096, kind)
    idx = torch.randint(0, 4096, (7, 33))
    assert torch.equal(D.sample_at(99, 5, idx, kind), whole[idx])


@pytest.mark.parametrize("kind", KINDS)
def test_values_do_not_depend_on_dtype_requested(kind):
    f32 = D.sample(3, 4, 10, 999, kind, dtype=torch.float32)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert torch.equal(D.sample(3, 4, 10, 999, kind, dtype=dtype), f32.to(dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_update_does_not_depend_on_chunk_size(kind):
    base = torch.randn(10_000, dtype=torch.float64)
    results = []
    for chunk in (128, 384, 1024, 8192, 1 << 14):
        p = base.clone()
        U.fused_update_reference_(p, [11, 22, 33], [0.5, -2.0, 1.5], 77, kind, lr=0.1, weight_decay=0.01, chunk=chunk)
        results.append(p)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_values_do_not_depend_on_device(kind):
    cpu = D.sample(5, 6, 3, 10_000, kind)
    cuda = D.sample(5, 6, 3, 10_000, kind, device="cuda").cpu()
    if kind == "rademacher":
        assert torch.equal(cpu, cuda)
    else:
        u_cpu = D.gaussian_uniforms(5, 6, 3, 10_000)
        u_cuda = D.gaussian_uniforms(5, 6, 3, 10_000, device="cuda")
        assert all(torch.equal(a, b.cpu()) for a, b in zip(u_cpu, u_cuda))
        torch.testing.assert_close(cpu, cuda, rtol=1e-5, atol=1e-5)


def test_rademacher_values_are_signs_and_gaussian_uniforms_in_range():
    s = D.rademacher(1, 2, 0, 10_000)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    u1, u2 = D.gaussian_uniforms(1, 2, 0, 10_000)
    assert (u1 > 0).all() and (u1 <= 1).all() and (u2 >= 0).all() and (u2 < 1).all()


def test_gaussian_is_box_muller_of_its_uniforms():
    u1, u2 = D.gaussian_uniforms(8, 9, 0, 4000)
    z = D.gaussian(8, 9, 0, 4000, dtype=torch.float64)
    r = torch.sqrt(-2 * torch.log(u1.double()))
    theta = u2.double() * (2 * math.pi)
    expected = torch.where(torch.arange(4000) % 2 == 0, r * torch.cos(theta), r * torch.sin(theta))
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


# ---- statistics: fixed thresholds that a broken generator fails -------------------------------------

N_STAT = 1 << 20


def test_sign_mean_near_zero():
    for seed in (0, 1, 2**40 + 3):
        s = D.rademacher(seed, 17, 0, N_STAT, dtype=torch.float64)
        assert abs(s.mean().item()) < 5 / math.sqrt(N_STAT)


def test_bit_balance_per_bit_position():
    n_blocks = 1 << 15
    words = D.block_words(42, 1, torch.arange(n_blocks, dtype=torch.int64), "rademacher")
    bits = (words.unsqueeze(-1) >> torch.arange(32)) & 1  # [n, 4, 32]
    frac = bits.double().mean(0)
    bound = 5 * math.sqrt(0.25 / n_blocks)
    assert (frac - 0.5).abs().max().item() < bound


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


@pytest.mark.parametrize("kind", KINDS)
def test_no_correlation_between_neighbouring_seeds_ids_and_elements(kind):
    bound = 5 / math.sqrt(N_STAT)
    base = D.sample(1000, 50, 0, N_STAT, kind, dtype=torch.float64)
    assert abs(_corr(base, D.sample(1001, 50, 0, N_STAT, kind, dtype=torch.float64))) < bound
    assert abs(_corr(base, D.sample(1000, 51, 0, N_STAT, kind, dtype=torch.float64))) < bound
    assert abs(_corr(base[:-1], base[1:])) < bound  # neighbouring elements
    assert abs(_corr(base[:-32], base[32:])) < bound  # same bit of neighbouring words
    assert abs(_corr(base[:-128], base[128:])) < bound  # neighbouring blocks


def test_gaussian_moments():
    z = D.gaussian(2024, 3, 0, N_STAT, dtype=torch.float64)
    mean, var = z.mean().item(), z.var().item()
    kurt = ((z - mean) ** 4).mean().item() / var**2
    assert abs(mean) < 5 / math.sqrt(N_STAT)
    assert abs(var - 1) < 5 * math.sqrt(2 / N_STAT)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / N_STAT)


# ---- ids ---------------------------------------------------------------------------------------------


def test_param_ids_are_stable_32_bit_and_collisions_raise(monkeypatch):
    # frozen: changing this breaks every saved trajectory
    assert I.stable_param_id("model.embed_tokens.weight") == I.stable_param_id("model.embed_tokens.weight")
    ids = I.assign_param_ids(["a.weight", "b.weight"])
    assert all(0 <= v < 2**32 for v in ids.values()) and ids["a.weight"] != ids["b.weight"]
    monkeypatch.setattr(I, "stable_param_id", lambda name: 7)
    with pytest.raises(I.ParamIdCollisionError, match="a.weight.*b.weight"):
        I.assign_param_ids(["a.weight", "b.weight"])


def test_frozen_layout_fingerprint():
    """The first words of known streams, pinned: a change here invalidates saved trajectories."""
    assert I.stable_param_id("weight") == int.from_bytes(
        __import__("hashlib").blake2b(b"weight", digest_size=8).digest()[:4], "little"
    )
    signs = D.rademacher(1, 2, 0, 8).tolist()
    words = D.block_words(1, 2, torch.tensor([0]), "rademacher")[0].tolist()
    assert signs == [1.0 - 2 * ((words[0] >> i) & 1) for i in range(8)]
    from zo_fx.streams.philox import philox4x32_10

    assert words == philox4x32_10(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 2])).tolist()
    gw = D.block_words(2**33 + 5, 9, torch.tensor([3]), "gaussian")[0].tolist()
    assert gw == philox4x32_10(torch.tensor([3, 0, 2, 1]), torch.tensor([5, 9])).tolist()


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        D.sample(1, 2, 0, 3, "uniform")
    with pytest.raises(ValueError, match="seed"):
        D.sample(-1, 2, 0, 3, "rademacher")
    with pytest.raises(ValueError, match="non-negative"):
        D.sample(1, 2, -5, 3, "rademacher")
