"""Optimizer settings are validated where they enter, and a resumed run takes none it was not given."""

import math

import pytest
import torch
from toy_problems import TOYS, Toy2D, identity_loss, toy_batch

import zo_fx
from zo_fx.kernels import update as update_kernels
from zo_fx.optim.trajectory import content_checksum


def toy_module(impl="auto"):
    model = Toy2D(*TOYS["quadratic"])
    return model, zo_fx.zo_compile(model, toy_batch(), loss=identity_loss, impl=impl)


BAD_SETTINGS = [
    ("fzoo", dict(lr=float("nan")), ValueError, "lr must be finite"),
    ("fzoo", dict(lr=float("inf")), ValueError, "lr must be finite"),
    ("mezo", dict(lr=-1e-3), ValueError, "lr must be >= 0"),
    ("mezo", dict(lr=1e-3, eps=0.0), ValueError, "eps must be > 0"),
    ("mezo", dict(lr=1e-3, eps=float("nan")), ValueError, "eps must be finite"),
    ("fzoo", dict(lr=1e-3, weight_decay=float("nan")), ValueError, "weight_decay must be finite"),
    ("fzoo", dict(lr=1e-3, kind="uniform"), ValueError, "kind: unknown direction kind .uniform.; use one of"),
    ("fzoo", dict(lr=1e-3, seed=1.7), TypeError, "seed must be an integer"),
    ("fzoo", dict(lr=1e-3, seed=-1), ValueError, "seed must be an integer in"),
    ("fzoo", dict(lr=1e-3, n_directions=1), ValueError, "n_directions"),
    ("fzoo", dict(lr=1e-3, n_directions=4.0), TypeError, "n_directions must be an integer"),
    ("adamezo", dict(lr=1e-3, horizon=0), ValueError, "horizon"),
    ("adamezo", dict(lr=1e-3, betas=(0.7, 1.0)), ValueError, r"betas\[1\] must be < 1"),
    ("adamezo", dict(lr=1e-3, betas=(0.7,)), ValueError, "betas must be"),
    ("adamezo", dict(lr=1e-3, adam_eps=0.0), ValueError, "adam_eps must be > 0"),
    ("mezo", dict(lr=1e-3, n_directions=4), TypeError, "MeZO has no setting 'n_directions'"),
    ("fzoo", dict(), TypeError, "needs a learning rate"),
]


@pytest.mark.parametrize("method, settings, error, message", BAD_SETTINGS,
                         ids=[f"{m}-{'-'.join(map(str, s.items()))}" for m, s, _, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_with_its_name(method, settings, error, message):
    _, zm = toy_module()
    with pytest.raises(error, match=message):
        zo_fx.build_optimizer(method, zm, **settings)


def test_keyword_settings_and_a_config_build_the_same_optimizer():
    _, zm = toy_module()
    by_keywords = zo_fx.AdaMeZO(zm, lr=1e-3, horizon=4, betas=(0.5, 0.8))
    by_config = zo_fx.AdaMeZO(zm, config=zo_fx.AdaMeZOConfig(lr=1e-3, horizon=4, betas=[0.5, 0.8]))
    assert by_keywords.config == by_config.config and by_config.config.betas == (0.5, 0.8)
    assert by_config.trajectory.horizon == 4 and by_config.trajectory.betas == (0.5, 0.8)
    with pytest.raises(TypeError, match="takes a AdaMeZOConfig"):
        zo_fx.AdaMeZO(zm, config=zo_fx.MeZOConfig(lr=1e-3))
    with pytest.raises(TypeError, match="either config= or keyword settings"):
        zo_fx.AdaMeZO(zm, lr=1e-3, config=zo_fx.AdaMeZOConfig(lr=1e-3))


def test_config_round_trips_through_its_dict():
    config = zo_fx.FZOOConfig(lr=2e-3, eps=1e-2, n_directions=5, seed=9, kind="gaussian")
    assert zo_fx.FZOOConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="has no settings"):
        zo_fx.FZOOConfig.from_dict({**config.to_dict(), "horizon": 3})


def test_registry_names_every_method_and_refuses_others():
    assert set(zo_fx.METHODS) == {"fzoo", "mezo", "adamezo", "es", "zosgd_momentum", "zoadam", "hizoo"}
    for name, method in zo_fx.METHODS.items():
        assert method.optimizer.Config is method.config and method.optimizer.method == name
    with pytest.raises(ValueError, match="unknown zeroth-order method 'sgd'"):
        zo_fx.build_optimizer("sgd", toy_module()[1], lr=1e-3)


@pytest.mark.parametrize("setting, value", [("horizon", 5), ("betas", (0.6, 0.9)), ("lr", 2e-3), ("scale", 10.0)])
def test_resume_refuses_any_setting_that_differs(setting, value):
    _, zm = toy_module()
    saved = zo_fx.AdaMeZO(zm, lr=1e-3, horizon=3)
    saved.step(toy_batch())
    state = saved.state_dict()
    other = zo_fx.AdaMeZO(zm, **{"lr": 1e-3, "horizon": 3, setting: value})
    with pytest.raises(ValueError, match=f"{setting}: saved"):
        other.load_state_dict(state)
    same = zo_fx.AdaMeZO(zm, lr=1e-3, horizon=3)
    same.load_state_dict(state)
    assert same.step_count == 1 and same.trajectory.records == saved.trajectory.records


def test_a_trajectory_with_other_constants_is_refused_on_resume():
    _, zm = toy_module()
    opt = zo_fx.AdaMeZO(zm, lr=1e-3, horizon=3)
    state = opt.state_dict()
    state["trajectory"]["horizon"] = 7  # the config says 3: the saved trajectory was not made by it
    with pytest.raises(ValueError, match="checksum"):  # an edited file
        zo_fx.AdaMeZO(zm, lr=1e-3, horizon=3).load_state_dict(state)
    state["trajectory"]["checksum"] = content_checksum(state["trajectory"])  # a consistent file of another run
    with pytest.raises(ValueError, match="horizon: saved 7, here 3"):
        zo_fx.AdaMeZO(zm, lr=1e-3, horizon=3).load_state_dict(state)


@pytest.mark.parametrize("bad_lr", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_scheduled_lr_skips_the_step(bad_lr):
    model, zm = toy_module()
    before = model.theta.detach().clone()
    opt = zo_fx.FZOO(zm, lr=1e-3, n_directions=3, lr_schedule=lambda step: bad_lr)
    info = opt.step(toy_batch())
    assert info.skipped and "learning rate" in info.reason and str(bad_lr) in info.reason
    assert torch.equal(model.theta, before) and len(opt.trajectory) == 0 and opt.skipped_steps == 1


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_the_impl_given_to_zo_compile_reaches_the_update(impl, monkeypatch):
    seen = []
    real = update_kernels.fused_update_

    def spy(*args, impl, **kwargs):
        seen.append(impl)
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(update_kernels, "fused_update_", spy)
    _, zm = toy_module(impl=impl)
    info = zo_fx.FZOO(zm, lr=1e-3, n_directions=3).step(toy_batch())
    assert not info.skipped and seen and set(seen) == {impl}


@pytest.mark.parametrize("seeds, coefs, eps, error, message", [
    ([1.7], [1.0], 1e-3, TypeError, "seed must be an integer"),
    ([True], [1.0], 1e-3, TypeError, "seed must be an integer"),
    ([2**64], [1.0], 1e-3, ValueError, r"\[0, 2\*\*64\)"),
    ([1], [math.nan], 1e-3, ValueError, "coefficient 0 must be finite"),
    ([1], [1.0], math.nan, ValueError, "eps must be finite"),
    ([1], [1.0], -1e-3, ValueError, "eps must be >= 0"),
])
def test_group_table_refuses_what_it_cannot_evaluate_exactly(seeds, coefs, eps, error, message):
    with pytest.raises(error, match=message):
        zo_fx.GroupTable(seeds, coefs, eps)
