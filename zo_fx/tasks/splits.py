"""How examples are divided into train / validation / test, and how they are subsampled.

Two rules, both deterministic:

* ``hash_split``: for data without splits of its own (the VADER lexicon, a user's jsonl file).
  Each example goes to a split chosen by a stable hash of a key (the word, the text), so the
  split never depends on file order, on the seed, or on which other examples exist, and the
  same key can never land in two splits.
* ``mezo_sample``: for the papers' datasets. MeZO (Malladi et al. 2023, ``large_models/run.py``
  and ``tasks.py``) draws ``n_train + n_val`` examples from the train split with
  ``np.random.seed(seed); np.random.permutation(n)``, keeps the last ``n_val`` as the dev set,
  and draws ``n_test`` evaluation examples from the validation split the same way.
  ``numpy.random.RandomState(seed).permutation`` is that very stream, so the same seed picks
  the same examples as MeZO.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Buckets 0..7 -> train, 8 -> validation, 9 -> test: an 80/10/10 split.
_N_BUCKETS = 10
_TRAIN_BUCKETS = range(0, 8)
_VALIDATION_BUCKET = 8


def hash_bucket(key: str, n_buckets: int = _N_BUCKETS) -> int:
    """A bucket in ``range(n_buckets)`` from blake2b of ``key``.

    Python's ``hash`` is salted per process, so it cannot make a split that survives a restart.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_buckets


def hash_split(items: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], list[T], list[T]]:
    """Split ``items`` 80/10/10 into (train, validation, test) by ``hash_bucket(key(item))``.

    Items keep their input order inside each split. Equal keys share a split, so splitting by
    the text keeps duplicates from leaking between train and test.
    """
    train: list[T] = []
    validation: list[T] = []
    test: list[T] = []
    for item in items:
        bucket = hash_bucket(key(item))
        if bucket in _TRAIN_BUCKETS:
            train.append(item)
        elif bucket == _VALIDATION_BUCKET:
            validation.append(item)
        else:
            test.append(item)
    return train, validation, test


def subsample(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """``n`` items drawn without replacement as MeZO's ``sample_subset`` draws them.

    ``n=None`` keeps every item in its original order; an ``n`` above ``len(items)`` is capped.
    """
    if n is None:
        return list(items)
    if n < 0:
        raise ValueError(f"sample size must be >= 0 or None, got {n}")
    order = np.random.RandomState(seed).permutation(len(items))[:n]
    return [items[i] for i in order.tolist()]


def mezo_sample(
    train_pool: Sequence[T],
    eval_pool: Sequence[T],
    *,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
) -> tuple[list[T], list[T], list[T]]:
    """MeZO's (train, validation, test): train and validation from ``train_pool``, test from
    ``eval_pool`` (the dataset's validation split, since SuperGLUE's test labels are hidden).

    When ``train_pool`` holds fewer than ``n_train + n_val`` examples, MeZO would still give
    the dev set its full ``n_val`` and leave the rest (possibly nothing) for training. zo_fx
    instead shrinks both in proportion, ``n_val' = floor(len * n_val / (n_train + n_val))``,
    so a small pool (CB has 250 training examples; a test fixture has 6) still trains on
    two thirds of it with the default 1000/500.
    """
    for field, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{field} must be >= 0, got {n}")
    drawn = subsample(train_pool, n_train + n_val, seed)
    if len(drawn) < n_train + n_val:
        n_val = len(drawn) * n_val // max(n_train + n_val, 1)
    n_kept_train = len(drawn) - n_val
    return drawn[:n_kept_train], drawn[n_kept_train:], subsample(eval_pool, n_test, seed)


def demonstration_indices(n_train: int, k: int, seed: int, task_name: str) -> list[int]:
    """Which ``k`` of ``n_train`` training examples a run shows as in-context demonstrations (fixed by ``seed``)."""
    import torch

    if k >= n_train:
        raise ValueError(f"{k} demonstrations need more than {n_train} training examples (task {task_name!r}); "
                         "lower the number of demonstrations")
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:k].tolist()
