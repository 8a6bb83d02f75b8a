"""The Triton Philox and direction helpers give the bits of the torch streams (docs/directions.md).

Without a GPU these run in Triton's CPU interpreter; on a GPU (``benchmarks/gpu_kernels.sh``)
the same tests run the compiled kernels on CUDA tensors.
"""

import random

import pytest
import torch
from close import assert_close, assert_equal
from triton_interpreter import device_for_kernels  # noqa: E402 (before zo_fx.kernels is imported)

DEVICE = device_for_kernels()

from random123_kat import KNOWN_ANSWERS, words  # noqa: E402

from zo_fx.kernels import pick  # noqa: E402
from zo_fx.kernels import tiles as TP  # noqa: E402
from zo_fx.streams import layout as D  # noqa: E402
from zo_fx.streams.philox import philox4x32_10  # noqa: E402


def _words(hex_words):
    return words(hex_words, DEVICE)


@pytest.fixture(autouse=True)
def _kernels_really_run():
    assert pick("triton", torch.zeros(1, device=DEVICE)) == "triton", (
        "Triton kernels cannot run: the test is vacuous"
    )


def _streams(rng: random.Random, n: int):
    """``n`` random (seed, pid, start, count): seeds on both sides of 2**32, ranges cutting blocks."""
    cases = []
    for i in range(n):
        seed = rng.randrange(2**32) if i % 2 else rng.randrange(2**32, 2**64)
        start = rng.choice([0, rng.randrange(1, 128), rng.randrange(2**20), rng.randrange(2**33, 2**40)])
        cases.append((seed, rng.randrange(2**32), start, rng.randrange(1, 700)))
    return cases


GAUSSIAN_ULPS = dict(rtol=1e-6, atol=1e-6)  # ~8 float32 ulps relative, ~8 ulps of 1 absolute (near zero)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answer_vectors(counter, key, expected):
    out = TP.triton_philox4x32_10(_words(counter), _words(key))
    assert [f"{w:08x}" for w in out.tolist()] == list(expected)


def test_philox_equals_torch_on_random_words_and_broadcasts_the_key():
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (300, 4), generator=g, dtype=torch.int64).to(DEVICE)
    keys = torch.randint(0, 2**32, (300, 2), generator=g, dtype=torch.int64).to(DEVICE)
    assert_equal(TP.triton_philox4x32_10(counters, keys), philox4x32_10(counters, keys), what="one key per counter")
    assert_equal(TP.triton_philox4x32_10(counters, keys[0]), philox4x32_10(counters, keys[0]), what="one key for all")


@pytest.mark.parametrize("seed, pid, start, count", _streams(random.Random(2), 6))
def test_rademacher_signs_are_identical(seed, pid, start, count):
    ours = TP.triton_rademacher(seed, pid, start, count, device=DEVICE)
    assert_equal(ours, D.rademacher(seed, pid, start, count, device=DEVICE))


@pytest.mark.parametrize("seed, pid, start, count", _streams(random.Random(3), 6))
def test_gaussian_uniforms_are_identical_and_values_agree_to_a_few_ulps(seed, pid, start, count):
    u1, u2 = TP.triton_gaussian_uniforms(seed, pid, start, count, device=DEVICE)
    r1, r2 = D.gaussian_uniforms(seed, pid, start, count, device=DEVICE)
    assert_equal(u1, r1, what="u1")
    assert_equal(u2, r2, what="u2")
    values = TP.triton_gaussian(seed, pid, start, count, device=DEVICE)
    assert_close(values, D.gaussian(seed, pid, start, count, device=DEVICE), **GAUSSIAN_ULPS, what="normals")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_tile_path_gives_the_stream_at_each_row(kind):
    """The aligned [rows, width] path the GEMM/update/embedding kernels use, against the torch stream."""
    rng = random.Random(4)
    seed, pid = rng.randrange(2**32, 2**64), rng.randrange(2**32)
    starts = [0, 32 * rng.randrange(1, 2**20), 128 * rng.randrange(2**30, 2**33), 96]
    tile = TP.triton_direction_rows(seed, pid, starts, 64, kind, device=DEVICE)
    expected = torch.stack([D.sample(seed, pid, s, 64, kind, device=DEVICE) for s in starts])
    if kind == "rademacher":
        assert_equal(tile, expected, what=f"rows starting at {starts}")
    else:
        assert_close(tile, expected, **GAUSSIAN_ULPS, what=f"rows starting at {starts}")


def test_tile_path_refuses_unaligned_rows():
    with pytest.raises(ValueError, match="multiples of 32"):
        TP.triton_direction_rows(1, 2, [16], 64, "rademacher", device=DEVICE)
