"""ES: antithetic pairs, fitness shaping, and the step against a hand-written float64 implementation."""

from __future__ import annotations

import pytest
import torch
from close import assert_rel_close
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_llama

import zo_fx
from zo_fx.optim.base import direction_seed
from zo_fx.optim.es import centered_ranks, zscores


def test_centered_ranks_on_hand_checked_values_with_ties():
    assert centered_ranks([3.0, 1.0, 2.0]) == [0.5, -0.5, 0.0]
    assert centered_ranks([1.0, 1.0, 3.0, 0.0]) == [0.0, 0.0, 0.5, -0.5]  # the tie shares ranks 1 and 2
    assert centered_ranks([2.0, 2.0]) == [0.0, 0.0]
    assert centered_ranks([5.0]) == [0.0]


def test_zscores_standardise_and_refuse_a_zero_spread():
    assert zscores([1.0, 3.0]) == [-1.0, 1.0]
    assert zscores([2.0, 2.0, 2.0]) is None


@pytest.mark.parametrize("shaping", ["centered_ranks", pytest.param("zscore", marks=pytest.mark.slow)])
def test_an_es_step_equals_its_formula_in_float64(shaping):
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    n, eps, lr, seed = 3, 1e-2, 0.05, 4
    opt = zo_fx.ES(zm, lr=lr, eps=eps, n_directions=n, seed=seed, shaping=shaping)
    table = opt.table()
    seeds = [direction_seed(seed, 0, i) for i in range(n)]
    assert list(table.seeds) == [s for s in seeds for _ in (0, 1)] and list(table.coefs) == [1.0, -1.0] * n
    losses = explicit_group_losses(model, zm, batch, table).mean(1).tolist()
    shaped = centered_ranks(losses) if shaping == "centered_ranks" else zscores(losses)
    coefs = [(shaped[2 * i] - shaped[2 * i + 1]) / (2 * n * eps) for i in range(n)]
    expected = {name: p.detach().clone() for name, p in zm.trainable_parameters().items()}
    for s, c in zip(seeds, coefs):
        for name, u in zm.direction(s, "gaussian").items():
            expected[name] -= lr * c * u
    info = opt.step(batch)
    assert not info.skipped and info.seeds == seeds
    assert info.coefs == pytest.approx(coefs, rel=1e-9)
    for name, p in zm.trainable_parameters().items():
        assert_rel_close(p, expected[name], 1e-9, what=name)


def test_a_step_without_any_loss_order_is_skipped_with_the_weights_untouched():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.ES(zm, lr=1.0, n_directions=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = lambda zm_, batch_, table, step: torch.ones(table.groups, 3)  # noqa: E731 - every group the same
    info = opt.step(batch, objective=flat)
    assert info.skipped and "no fitness order" in info.reason
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
