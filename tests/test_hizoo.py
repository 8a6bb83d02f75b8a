"""HiZOO: directions scaled by a stored diagonal curvature, inside the one batched forward.

* A forward under :func:`zo_fx.kernels.scaling.scaled_directions` equals the eager model with its
  weights moved by ``eps * c * z / sqrt(H)`` on families whose perturbations take different paths
  (a tied embedding and fused head, GPT-2's Conv1D weights, a LoRA adapter, a classification
  readout of label rows only).
* Three HiZOO steps equal the paper's formulas written out by hand in float64.
* On a diagonal quadratic the curvature estimate lines up with the diagonal.
* Resume, replay and lr = 0 are exact; Rademacher and low-rank directions are refused.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from close import assert_bitwise_equal, assert_rel_close
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_gpt2, tiny_llama, tiny_lora_llama

import zo_fx
from zo_fx.kernels import blocked
from zo_fx.kernels.scaling import scaled_directions
from zo_fx.optim import load_checkpoint, save_checkpoint
from zo_fx.optim.base import direction_seed

LR, EPS, SEED, ALPHA = 1e-2, 1e-2, 3, 0.2


def _random_curvature(zm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {zm.pids[n]: torch.rand(p.shape, generator=g, dtype=p.dtype) * 3 + 0.25
            for n, p in zm.trainable_parameters().items()}


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2, tiny_lora_llama])
@pytest.mark.parametrize("tile", [None, 256])
def test_scaled_group_losses_equal_the_explicitly_perturbed_model(make_model, tile, monkeypatch):
    """The blocked GEMM applies the scale tile by tile (``tile`` elements: many tiles per weight)."""
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", tile)
    scaled_tiles = []
    original = blocked._scaled_tiles
    monkeypatch.setattr(blocked, "_scaled_tiles", lambda *a: scaled_tiles.append(1) or original(*a))
    model, batch = make_model(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    rng = random.Random(1)
    s, t = rng.randrange(2**63), rng.randrange(2**63)
    table = zo_fx.GroupTable([s, s, s, t], [0.0, 1.0, -1.0, 0.5], 1e-3, "gaussian")
    with scaled_directions(_random_curvature(zm)):
        got = zm.group_losses(batch, table)
        expected = explicit_group_losses(model, zm, batch, table)  # zm.direction is scaled here too
    assert_rel_close(got, expected, 1e-10, what=make_model.__name__)
    assert scaled_tiles, "the scaled weights took the blocked GEMM"
    assert not torch.allclose(got, zm.group_losses(batch, table), rtol=1e-6, atol=0), "the scale reaches the loss"


def test_a_scaled_classification_readout_equals_the_explicit_model():
    model, batch = tiny_llama(), causal_batch()
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "class_labels": torch.tensor([0, 1, 0])}
    loss = zo_fx.CandidateClassificationLoss([5, 9])
    zm = zo_fx.zo_compile(model, batch, loss=loss)
    table = zo_fx.GroupTable([7, 7, 11], [0.0, 1.0, -0.5], 1e-3, "gaussian")
    with scaled_directions(_random_curvature(zm, seed=2)):
        got = zm.group_losses(batch, table)
        expected = explicit_group_losses(model, zm, batch, table, loss)
    assert_rel_close(got, expected, 1e-10, what="readout")


def test_a_scale_no_path_applied_is_an_error_not_an_unscaled_direction():
    with pytest.raises(RuntimeError, match="was not applied"):
        with scaled_directions({123456: torch.ones(3)}):
            pass


def _hand_written(steps: int):
    """HiZOO's formulas, by hand in float64, on explicitly perturbed copies of the eager model."""
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    params = {n: p.detach().clone() for n, p in zm.trainable_parameters().items()}
    h = {n: torch.ones_like(p) for n, p in params.items()}
    for t in range(steps):
        s = direction_seed(SEED, t, 0)
        z = zm.direction(s, "gaussian")
        losses = []
        for coef in (0.0, 1.0, -1.0):
            with torch.no_grad():
                for n, p in zm.trainable_parameters().items():
                    p.copy_(params[n] + EPS * coef * z[n] / h[n].sqrt())
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses.append(float(zo_fx.causal_lm_loss(out, batch).mean()))
        l0, plus, minus = losses
        proj = (plus - minus) / (2 * EPS)
        curvature = abs(plus + minus - 2 * l0) / (2 * EPS * EPS)
        for n in params:
            h[n] = (1 - ALPHA) * h[n] + ALPHA * curvature * h[n] * z[n] ** 2
            params[n] = params[n] - LR * proj * z[n] / h[n].sqrt()
    return params, h


def _run(steps: int, model=None):
    model, batch = model or tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.HiZOO(zm, lr=LR, eps=EPS, seed=SEED, hessian_smooth=ALPHA)
    for _ in range(steps):
        assert not opt.step(batch).skipped
    return model, zm, opt, batch


def test_three_steps_equal_the_formulas_in_float64():
    expected, h = _hand_written(3)
    _, zm, opt, _ = _run(3)
    for n, p in zm.trainable_parameters().items():
        assert_rel_close(p, expected[n], 1e-9, what=n)
        assert_rel_close(opt.state[n]["h"], h[n], 1e-9, what=f"H of {n}")
    assert {key.split("::")[1] for key in opt.state_tensors()} == {"h"}


class Quadratic(torch.nn.Module):
    """``0.5 * sum_i h_i theta_i^2`` for every example: a known diagonal Hessian."""

    def __init__(self, diagonal):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones(len(diagonal), dtype=torch.float64))
        self.register_buffer("diagonal", torch.tensor(diagonal, dtype=torch.float64))

    def forward(self, x):
        return x[:, :1] * 0 + 0.5 * (self.diagonal * self.theta**2).sum()


def test_the_curvature_estimate_lines_up_with_a_known_diagonal():
    diagonal = [1.0, 4.0, 9.0, 16.0]
    model = Quadratic(diagonal)
    batch = {"x": torch.zeros(2, 1, dtype=torch.float64)}
    zm = zo_fx.zo_compile(model, batch, loss=lambda out, b: out[:, 0])
    opt = zo_fx.HiZOO(zm, lr=0.0, eps=1e-3, seed=0, hessian_smooth=0.02)
    logs = []
    for step in range(600):
        opt.step(batch)
        if step >= 300:
            logs.append(opt.state["theta"]["h"].log())
    log_ratio = torch.stack(logs).mean(0) - torch.tensor(diagonal, dtype=torch.float64).log()
    spread = float(log_ratio.max() - log_ratio.min())
    start = math.log(16.0)  # H = ones: log(H / h) spans the whole diagonal
    print(f"log(H/h) after 600 steps: {log_ratio.tolist()}, spread {spread:.3f} (start {start:.3f})")
    assert spread < 0.35 * start
    order = torch.stack(logs).mean(0).argsort().tolist()
    assert order == [0, 1, 2, 3], "H ranks the curvatures as the diagonal does"


def test_resume_replay_and_lr_zero_are_exact(tmp_path):
    straight, _, _, _ = _run(4)
    model, zm, opt, batch = _run(2)
    save_checkpoint(tmp_path, model, opt)
    fresh = tiny_llama()
    opt2 = zo_fx.HiZOO(zo_fx.zo_compile(fresh, batch), lr=LR, eps=EPS, seed=SEED, hessian_smooth=ALPHA)
    load_checkpoint(tmp_path, fresh, opt2, log=None)
    for _ in range(2):
        opt2.step(batch)
    replayed = zo_fx.replay(tiny_llama(), zo_fx.Trajectory.from_dict(opt2.trajectory.to_dict()))
    for n, p in straight.named_parameters():
        assert_bitwise_equal(dict(fresh.named_parameters())[n], p, what=f"resumed {n}")
        assert_bitwise_equal(dict(replayed.named_parameters())[n], p, what=f"replayed {n}")
    still = tiny_llama()
    before = {n: p.detach().clone() for n, p in still.named_parameters()}
    opt0 = zo_fx.HiZOO(zo_fx.zo_compile(still, batch), lr=0.0, eps=EPS, seed=SEED, hessian_smooth=ALPHA)
    for _ in range(2):
        opt0.step(batch)
    for n, p in still.named_parameters():
        assert_bitwise_equal(p, before[n], what=f"lr=0 {n}")


@pytest.mark.parametrize(("kind", "rank"), [("rademacher", None), ("lowrank", 2)])
def test_directions_other_than_gaussian_are_refused(kind, rank):
    with pytest.raises(ValueError, match="needs Gaussian directions"):
        zo_fx.HiZOOConfig(lr=1e-3, kind=kind, rank=rank)
    assert zo_fx.HiZOOConfig(lr=1e-3).kind == "gaussian"
