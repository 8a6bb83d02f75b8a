"""ZO-SGD with momentum and ZO-Adam: stored buffers, against hand-written float64 implementations.

Each check runs three steps on a tiny float64 Llama and compares the weights with the formulas
applied to the explicitly perturbed model's losses and the dense directions; then resume from a
checkpoint and replay of the trajectory must reproduce the run bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from close import assert_bitwise_equal, assert_rel_close
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_llama

import zo_fx
from zo_fx.optim import load_checkpoint, save_checkpoint
from zo_fx.optim.base import direction_seed

LR, EPS, SEED = 1e-2, 1e-2, 3


def _hand_written(method: str, steps: int, **settings):
    """The weights after ``steps`` updates, the formulas applied by hand in float64."""
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    params = {n: p.detach().clone() for n, p in zm.trainable_parameters().items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(1, steps + 1):
        for n, p in zm.trainable_parameters().items():
            p.data.copy_(params[n])
        s = direction_seed(SEED, t - 1, 0)
        table = zo_fx.GroupTable([s, s], [1.0, -1.0], EPS, "gaussian")
        losses = explicit_group_losses(model, zm, batch, table).mean(1)
        proj = float(losses[0] - losses[1]) / (2 * EPS)
        for n, u in zm.direction(s, "gaussian").items():
            g = proj * u
            if method == "zosgd_momentum":
                m[n] = settings.get("momentum", 0.9) * m[n] + g
                step = m[n]
            else:
                b1, b2 = settings.get("betas", (0.9, 0.999))
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                step = (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + settings.get("adam_eps", 1e-8))
            params[n] = params[n] - LR * step
    return params


def _run(method: str, steps: int, **settings):
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.build_optimizer(method, zm, lr=LR, eps=EPS, seed=SEED, **settings)
    for _ in range(steps):
        assert not opt.step(batch).skipped
    return model, zm, opt, batch


@pytest.mark.parametrize(("method", "settings"), [("zosgd_momentum", {"momentum": 0.8}),
                                                  ("zoadam", {"betas": (0.8, 0.99), "adam_eps": 1e-6})])
def test_three_steps_equal_the_formulas_in_float64(method, settings):
    expected = _hand_written(method, 3, **settings)
    _, zm, opt, _ = _run(method, 3, **settings)
    for n, p in zm.trainable_parameters().items():
        assert_rel_close(p, expected[n], 1e-9, what=n)
    buffers = {"zosgd_momentum": {"m"}, "zoadam": {"m", "v"}}[method]
    assert {key.split("::")[1] for key in opt.state_tensors()} == buffers
    assert len(opt.state_tensors()) == len(buffers) * len(zm.trainable_parameters())


@pytest.mark.parametrize("method", [pytest.param("zosgd_momentum", marks=pytest.mark.slow), "zoadam"])
def test_resume_from_a_checkpoint_and_replay_are_bit_exact(method, tmp_path):
    straight, _, _, _ = _run(method, 4)
    model, zm, opt, batch = _run(method, 2)
    save_checkpoint(tmp_path, model, opt)
    assert (tmp_path / "step-00000002" / "state.safetensors").is_file()
    fresh = tiny_llama()
    zm2 = zo_fx.zo_compile(fresh, batch)
    opt2 = zo_fx.build_optimizer(method, zm2, lr=LR, eps=EPS, seed=SEED)
    load_checkpoint(tmp_path, fresh, opt2, log=None)
    for _ in range(2):
        opt2.step(batch)
    for n, p in fresh.named_parameters():
        assert_bitwise_equal(p, dict(straight.named_parameters())[n], what=f"resumed {n}")
    replayed = zo_fx.replay(tiny_llama(), zo_fx.Trajectory.from_dict(opt2.trajectory.to_dict()))
    for n, p in replayed.named_parameters():
        assert_bitwise_equal(p, dict(straight.named_parameters())[n], what=f"replayed {n}")
    with pytest.raises(zo_fx.TrajectoryError, match="replay it from start=0"):
        zo_fx.replay(tiny_llama(), opt2.trajectory, start=1)


def test_a_state_restored_without_its_buffers_refuses_to_step():
    _, zm, opt, batch = _run("zoadam", 1)
    again = zo_fx.build_optimizer("zoadam", zm, lr=LR, eps=EPS, seed=SEED)
    again.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="load_state_tensors"):
        again.step(batch)
    again.load_state_tensors(opt.state_tensors())
    assert not again.step(batch).skipped


def test_lr_zero_leaves_weights_bit_identical_and_bad_betas_are_refused():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method in ("zosgd_momentum", "zoadam"):
        opt = zo_fx.build_optimizer(method, zm, lr=0.0, eps=EPS)
        opt.step(batch)
        opt.step(batch)
    for n, p in model.named_parameters():
        assert_bitwise_equal(p, before[n], what=n)
    with pytest.raises(ValueError, match="b1 must be below sqrt"):
        zo_fx.ZOAdamConfig(lr=1e-3, betas=(0.99, 0.9))
    with pytest.raises(ValueError, match="momentum"):
        zo_fx.ZOSGDMomentumConfig(lr=1e-3, momentum=1.0)
