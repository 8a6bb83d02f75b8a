"""Philox4x32-10 in torch: the Random123 known-answer vectors and the 32x32-bit multiply."""

import random

import pytest
import torch
from random123_kat import KNOWN_ANSWERS, words

from zo_fx.streams.philox import _mulhilo, philox4x32_10


def _words(hex_words):
    return words(hex_words)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answer_vectors(counter, key, expected):
    out = philox4x32_10(_words(counter), _words(key))
    assert out.tolist() == _words(expected).tolist()


def test_batched_call_equals_single_calls_and_broadcasts_key():
    counters = torch.stack([_words(c) for c, _, _ in KNOWN_ANSWERS])
    keys = torch.stack([_words(k) for _, k, _ in KNOWN_ANSWERS])
    expected = torch.stack([_words(e) for _, _, e in KNOWN_ANSWERS])
    assert torch.equal(philox4x32_10(counters, keys), expected)
    # one key for many counters
    shared = philox4x32_10(counters, keys[0])
    for i in range(3):
        assert torch.equal(shared[i], philox4x32_10(counters[i], keys[0]))


def test_outputs_stay_uint32():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 2**32, (1000, 4), generator=g, dtype=torch.int64)
    k = torch.randint(0, 2**32, (1000, 2), generator=g, dtype=torch.int64)
    out = philox4x32_10(c, k)
    assert out.min() >= 0 and out.max() < 2**32


@pytest.mark.parametrize("const", [0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1])
def test_mulhilo_matches_python_integers(const):
    rng = random.Random(const)
    xs = [0, 1, 2**32 - 1, 2**31] + [rng.randrange(2**32) for _ in range(2000)]
    hi, lo = _mulhilo(const, torch.tensor(xs, dtype=torch.int64))
    for x, h, lw in zip(xs, hi.tolist(), lo.tolist()):
        assert (h, lw) == divmod(const * x, 2**32)


def test_rejects_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match="int64"):
        philox4x32_10(torch.zeros(4, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension"):
        philox4x32_10(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
