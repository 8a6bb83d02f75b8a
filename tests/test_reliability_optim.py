"""Nothing silent in a step: weights stay finite or the step is refused, one bad example costs one example."""

import math

import pytest
import torch
from model_zoo import causal_batch, tiny_llama

import zo_fx
from zo_fx.optim.guard import GAUSSIAN_MAX, step_max
from zo_fx.streams import GroupTable
from zo_fx.streams import layout as D


def _weights(zm):
    return {n: p.detach().clone() for n, p in zm.trainable_parameters().items()}


def _all_finite(zm) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in zm.trainable_parameters().values())


class HalfLine(torch.nn.Module):
    """A float16 parameter pair whose loss (their sum, in float32) stays finite while they do:
    descending it drives the weights towards -inf, as an absurd lr does to a real model."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([3e4, -2e4], dtype=torch.float16))

    def forward(self, x):
        return self.theta.float().sum() + x[:, 0]


@pytest.mark.parametrize("method", ["fzoo", "mezo", "adamezo"])
def test_a_float16_run_at_an_absurd_lr_keeps_every_weight_finite(method):
    batch = {"x": torch.zeros(2, 1)}
    settings = {"horizon": 1} if method == "adamezo" else {}
    zm = zo_fx.zo_compile(HalfLine(), batch, loss=lambda out, b: out)
    opt = zo_fx.build_optimizer(method, zm, lr=6e4, eps=64.0, kind="rademacher", **settings)
    refused = 0
    for _ in range(6):
        before = _weights(opt.zm)
        info = opt.step(batch)
        assert all(math.isfinite(v) for v in info.losses)
        assert _all_finite(opt.zm), f"step {info.step} left a non-finite weight ({info.reason})"
        if info.skipped:
            assert all(torch.equal(before[n], p) for n, p in opt.zm.trainable_parameters().items())
            assert "step skipped, weights untouched" in info.reason and info.nonfinite
            refused += "non-finite in torch.float16" in info.reason
    assert refused, "at this lr an update overflows float16: the guard must have refused it"
    assert len(opt.trajectory) == 6 - opt.skipped_steps, "a refused update leaves no record to replay"


def test_the_bound_covers_every_gaussian_value_and_every_adamezo_step():
    values = D.gaussian(5, 11, 0, 1 << 20)
    assert float(values.abs().max()) <= GAUSSIAN_MAX
    # AdaMeZO: |m| / sqrt(v) over any window is at most sqrt(sum (b1^2/b2)^j); try adversarial coefficients
    g = torch.Generator().manual_seed(0)
    traj = zo_fx.Trajectory(method="adamezo", kind="rademacher", weight_decay=0.0, params=[])
    traj.horizon, traj.betas, traj.ada_scale = 5, (0.7, 0.9), 1.0
    bound = step_max(traj, {"mode": "adamezo"})
    for _ in range(200):
        p = torch.randn(5, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)
        z = torch.sign(torch.randn(5, 1000, generator=g, dtype=torch.float64))
        b1 = 0.7 ** torch.arange(5, dtype=torch.float64)
        b2 = 0.9 ** torch.arange(5, dtype=torch.float64)
        m, v = (b1[:, None] * p[:, None] * z).sum(0), (b2[:, None] * (p[:, None] * z) ** 2).sum(0)
        assert float((m.abs() / v.sqrt()).max()) <= bound * (1 + 1e-12)


@pytest.mark.parametrize("setting, value", [("lr", 1e6), ("eps", 1e5)])
def test_settings_beyond_the_weights_dtype_range_are_refused_where_they_enter(setting, value):
    model, batch = tiny_llama(torch.float16), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    with pytest.raises(ValueError, match=f"{setting} .*float16"):
        zo_fx.FZOO(zm, **{"lr": 1e-3, setting: value})
    zo_fx.FZOO(zm, lr=1e-3)  # in range: accepted


def test_weights_already_non_finite_are_named_and_never_stepped_on():
    model, batch = tiny_llama(torch.float32, tied=False), causal_batch()
    unused = sorted(set(range(model.config.vocab_size)) - set(batch["input_ids"].flatten().tolist()))[0]
    with torch.no_grad():  # an embedding row no example looks up: the losses stay finite
        model.model.embed_tokens.weight[unused] = math.inf
    opt = zo_fx.FZOO(zo_fx.zo_compile(model, batch), lr=1e-3, n_directions=3)
    before = _weights(opt.zm)
    info = opt.step(batch)
    assert all(math.isfinite(v) for v in info.losses)
    assert info.skipped and "already non-finite" in info.reason and "embed_tokens" in info.reason
    assert all(torch.equal(before[n], p) for n, p in opt.zm.trainable_parameters().items())


def _poisoned(example: int, group: int | None, groups: int, batch_size: int):
    """A causal-LM loss that is NaN for one example, in one group or in every group.

    The loss may be called once per group (the fused head) or once for all groups: a call counter
    tells the groups apart either way."""
    calls = {"groups": 0}

    def loss(logits, batch):
        out = zo_fx.causal_lm_loss(logits, batch).clone()
        rows = out.view(-1, batch_size)
        for r in range(rows.shape[0]):
            g = (calls["groups"] + r) % groups
            if group is None or g == group:
                rows[r, example] = math.nan
        calls["groups"] += rows.shape[0]
        return out
    return loss


@pytest.mark.parametrize("group", [None, 2])
def test_an_example_with_a_non_finite_loss_is_dropped_from_every_group(group):
    model, batch = tiny_llama(), causal_batch(batch_size=4)
    clean = zo_fx.zo_compile(model, batch)
    opt = zo_fx.FZOO(zo_fx.zo_compile(model, batch, loss=_poisoned(1, group, 4, 4)), lr=0.0, n_directions=3, seed=5)
    table = opt.table()
    expected = clean.group_losses(batch, table).double()[:, [0, 2, 3]].mean(1).tolist()
    info = opt.step(batch)
    assert not info.skipped and info.dropped_examples == [1]
    assert info.losses == pytest.approx(expected, rel=1e-12)


def test_a_step_where_every_example_fails_is_skipped_with_weights_untouched():
    model, batch = tiny_llama(), causal_batch(batch_size=2)
    first, second = _poisoned(0, 2, 4, 2), _poisoned(1, 0, 4, 2)  # each example fails in one group

    opt = zo_fx.FZOO(zo_fx.zo_compile(model, batch, loss=lambda o, b: first(o, b) + second(o, b)), lr=1e-2,
                     n_directions=3)
    before = _weights(opt.zm)
    info = opt.step(batch)
    assert info.skipped and info.nonfinite and "every example" in info.reason
    assert all(torch.equal(before[n], p) for n, p in opt.zm.trainable_parameters().items())


def test_group_losses_of_dropped_examples_do_not_touch_the_others():
    """What dropping relies on: an example's group losses do not depend on another example's values."""
    model, batch = tiny_llama(), causal_batch(batch_size=3)
    zm = zo_fx.zo_compile(model, batch)
    table = GroupTable([0, 7, 9], [0.0, 1.0, 1.0], 1e-3)
    full = zm.group_losses(batch, table)
    alone = zm.group_losses({k: v[[0, 2]] for k, v in batch.items()}, table)
    torch.testing.assert_close(full[:, [0, 2]], alone, rtol=1e-12, atol=0)
