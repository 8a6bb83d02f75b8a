"""Every registered method (MeZO, FZOO, AdaMeZO, ES, ZO-SGD momentum, ZO-Adam, HiZOO): formulas, exactness,
skipping, replay and resume. The newer methods' formulas are in test_es.py, test_stateful_methods.py and
test_hizoo.py."""

import copy
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_llama
from toy_problems import TOYS, Toy2D, identity_loss, toy_batch

import zo_fx
from zo_fx.kernels.update import adamezo_update_reference_
from zo_fx.optim.base import decays, direction_seed
from zo_fx.streams import GroupTable
from zo_fx.streams import layout as D

SETTINGS = {
    "mezo": dict(eps=1e-3, weight_decay=0.01, seed=3),
    "fzoo": dict(eps=1e-3, n_directions=4, weight_decay=0.01, seed=3),
    "adamezo": dict(eps=1e-3, horizon=3, weight_decay=0.01, seed=3),
    "es": dict(eps=1e-3, n_directions=2, weight_decay=0.01, seed=3),
    "zosgd_momentum": dict(eps=1e-3, momentum=0.8, weight_decay=0.01, seed=3),
    "zoadam": dict(eps=1e-3, betas=(0.8, 0.99), weight_decay=0.01, seed=3),
    "hizoo": dict(eps=1e-3, hessian_smooth=0.05, weight_decay=0.01, seed=3),
}
assert set(SETTINGS) == set(zo_fx.METHODS), "every registered method is tested"


def make_optimizer(method: str, zm, lr: float, **overrides):
    """The registry's optimizer ``method`` with this file's settings (``overrides`` win)."""
    return zo_fx.build_optimizer(method, zm, lr=lr, **{**SETTINGS[method], **overrides})


def _weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _bit_identical(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _batches(n, batch_size=3, seq_len=7):
    return [causal_batch(batch_size, seq_len, seed=i) for i in range(n)]


# ---- formulas, against a plain hand-written implementation in float64 -------------------------------


def test_mezo_step_equals_hand_written_formula():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    before = _weights(model)
    opt = zo_fx.MeZO(zm, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)
    info = opt.step(batch)

    s = direction_seed(7, 0, 0)
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    table = GroupTable([s, s], [1.0, -1.0], 1e-3, "gaussian")
    l_plus, l_minus = explicit_group_losses(reference, zm, batch, table).mean(1).tolist()
    p = (l_plus - l_minus) / (2e-3)
    assert info.coefs == pytest.approx([p], rel=1e-10) and info.losses == pytest.approx([l_plus, l_minus], rel=1e-12)
    z = zm.direction(s, "gaussian")
    for name, param in reference.named_parameters():
        wd = 0.1 if decays(name, param) else 0.0
        expected = param - 1e-2 * (p * z[name] + wd * param)
        torch.testing.assert_close(dict(model.named_parameters())[name], expected, rtol=1e-12, atol=1e-14)


def test_fzoo_step_equals_hand_written_formula():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    before = _weights(model)
    n = 5
    opt = zo_fx.FZOO(zm, lr=1e-2, eps=1e-3, n_directions=n, seed=11)
    info = opt.step(batch)

    seeds = [direction_seed(11, 0, i) for i in range(n)]
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    table = GroupTable([0] + seeds, [0.0] + [1.0] * n, 1e-3, "rademacher")
    losses = explicit_group_losses(reference, zm, batch, table).mean(1)
    l0, li = losses[0], losses[1:]
    sigma = li.std(unbiased=False)  # the reference code's population std
    coefs = (li - l0) / (n * sigma)
    assert info.sigma == pytest.approx(sigma.item(), rel=1e-10)
    assert info.coefs == pytest.approx(coefs.tolist(), rel=1e-8)
    directions = [zm.direction(s, "rademacher") for s in seeds]
    for name, param in reference.named_parameters():
        expected = param - 1e-2 * sum(c * d[name] for c, d in zip(coefs.tolist(), directions))
        torch.testing.assert_close(dict(model.named_parameters())[name], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [128, 256, 640, 1 << 14])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_adamezo_blockwise_replay_equals_materialised_moments(chunk, kind):
    """Moments rebuilt chunk by chunk from seeds == the float64 formula with K stored directions."""
    param = torch.randn(37, 29, dtype=torch.float64)  # 1073 elements: every chunk size cuts it
    seeds, coefs = [5, 2**40 + 1, 77, 9], [1.5, -0.25, 3.0, -2.0]  # most recent first
    b1, b2, lr, wd = 0.7, 0.9, 1e-3, 0.05
    expected = param.clone()
    zs = [D.direction(s, 123, param.shape, kind, dtype=torch.float64) for s in seeds]
    m = sum(b1**j * c * z for j, (c, z) in enumerate(zip(coefs, zs)))
    v = sum(b2**j * (c * z) ** 2 for j, (c, z) in enumerate(zip(coefs, zs)))
    expected -= lr * (100.0 * m / (v.sqrt() + 1e-5) + wd * expected)
    adamezo_update_reference_(param, seeds, coefs, 123, kind, lr, (b1, b2), wd, chunk=chunk)
    torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-13)


def test_adamezo_scratch_memory_is_bounded_by_the_chunk():
    """The largest tensor the update allocates is one chunk, whatever the parameter size and K."""
    from torch.utils._python_dispatch import TorchDispatchMode

    param = torch.randn(12_000, dtype=torch.float64)
    largest = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() != param_storage:
                largest.append(out.numel())  # a new allocation, not a view of the parameter
            return out

    param_storage = param.untyped_storage().data_ptr()
    with Record():
        adamezo_update_reference_(param, list(range(6)), [0.1] * 6, 1, "gaussian", 1e-3, chunk=1024)
    assert max(largest) <= 1024 * 32  # one chunk of values (the sign expansion works on 32 bits per word)


def test_adamezo_warms_up_with_mezo_steps_then_uses_moments():
    model, batch = tiny_llama(), causal_batch()
    opt = zo_fx.AdaMeZO(zo_fx.zo_compile(model, batch), lr=1e-4, horizon=3)
    for b in _batches(5):
        opt.step(b)
    modes = [r["mode"] for r in opt.trajectory.records]
    assert modes == ["linear"] * 3 + ["adamezo"] * 2


# ---- exactness ---------------------------------------------------------------------------------------


#: the methods whose lr=0, replay and resume checks the default suite runs here (the others: test_lowrank.py,
#: test_es.py and test_stateful_methods.py check theirs, and -m slow runs them here too)
CORE = ("mezo", "fzoo", "adamezo")
CORE_PARAMS = [m if m in CORE else pytest.param(m, marks=pytest.mark.slow) for m in sorted(SETTINGS)]


@pytest.mark.parametrize("method", CORE_PARAMS)
def test_zero_learning_rate_leaves_every_weight_bit_identical(method):
    model, batch = tiny_llama(torch.float32), causal_batch()
    before = _weights(model)
    opt = make_optimizer(method, zo_fx.zo_compile(model, batch), 0.0, weight_decay=0.0)
    for b in _batches(5):
        opt.step(b)
    assert _bit_identical(before, _weights(model))


@pytest.mark.parametrize("method", CORE_PARAMS)
def test_replay_reproduces_trained_weights_bit_for_bit(method, tmp_path):
    model, batch = tiny_llama(torch.float32), causal_batch()
    base = copy.deepcopy(model)
    opt = make_optimizer(method, zo_fx.zo_compile(model, batch), 1e-3)
    for b in _batches(6):
        opt.step(b)
    path = opt.trajectory.save(tmp_path / "trajectory.json")
    assert path.stat().st_size < 4096  # seeds and coefficients, not a model copy
    replayed = zo_fx.replay(base, zo_fx.Trajectory.load(path))
    assert _bit_identical(_weights(model), _weights(replayed))
    assert not _bit_identical(_weights(model), _weights(tiny_llama(torch.float32)))


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import zo_fx
    from zo_fx.optim.checkpoint import load_checkpoint
    from model_zoo import causal_batch, tiny_llama
    from test_optimizers import make_optimizer
    model = tiny_llama(torch.float32)
    opt = make_optimizer({method!r}, zo_fx.zo_compile(model, causal_batch()), 1e-3)
    extra = load_checkpoint({ckpt!r}, model, opt)
    for i in range(extra["next_batch"], {total}):
        opt.step(causal_batch(3, 7, seed=i))
    torch.save(model.state_dict(), {out!r})
    """
)


@pytest.mark.parametrize("method", CORE_PARAMS)
def test_resume_in_a_new_process_equals_running_straight(method, tmp_path):
    from zo_fx.optim.checkpoint import save_checkpoint

    t = 3
    model = tiny_llama(torch.float32)
    opt = make_optimizer(method, zo_fx.zo_compile(model, causal_batch()), 1e-3)
    straight = tiny_llama(torch.float32)
    opt_straight = make_optimizer(method, zo_fx.zo_compile(straight, causal_batch()), 1e-3)
    for i in range(2 * t):
        opt_straight.step(causal_batch(3, 7, seed=i))
    for i in range(t):
        opt.step(causal_batch(3, 7, seed=i))
    save_checkpoint(tmp_path / "run", model, opt, extra={"next_batch": t})
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), method=method, ckpt=str(tmp_path / "run"),
                                  total=2 * t, out=str(tmp_path / "resumed.pt"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent)
    resumed = torch.load(tmp_path / "resumed.pt")
    assert _bit_identical(_weights(straight), resumed)


# ---- robustness --------------------------------------------------------------------------------------


def test_nan_loss_mid_run_is_skipped_and_reported_and_training_goes_on():
    model, batch = tiny_llama(torch.float32), causal_batch()
    poisoned = {"on": False}

    def flaky_loss(logits, b):
        loss = zo_fx.causal_lm_loss(logits, b)
        return loss * float("nan") if poisoned["on"] else loss

    opt = zo_fx.FZOO(zo_fx.zo_compile(model, batch, loss=flaky_loss), lr=1e-3, n_directions=3)
    infos = []
    for step in range(3):
        poisoned["on"] = step == 1
        before = _weights(model)
        infos.append(opt.step(batch))
        if step == 1:
            assert _bit_identical(before, _weights(model))
    assert [i.skipped for i in infos] == [False, True, False]
    assert "non-finite" in infos[1].reason
    assert len(opt.trajectory) == 2 and infos[-1].forward_passes == 12


def test_equal_losses_skip_the_fzoo_step():
    model, batch = tiny_llama(torch.float32), causal_batch()
    opt = zo_fx.FZOO(zo_fx.zo_compile(model, batch, loss=lambda o, b: torch.zeros(o.shape[0])), lr=1.0)
    before = _weights(model)
    info = opt.step(batch)
    assert info.skipped and "sigma = 0" in info.reason and _bit_identical(before, _weights(model))


def test_half_precision_update_accumulates_in_float32_and_rounds_once():
    model, batch = tiny_llama(torch.bfloat16), causal_batch()
    before = _weights(model)
    opt = zo_fx.MeZO(zo_fx.zo_compile(model, batch), lr=1e-2, eps=1e-2, kind="rademacher")
    info = opt.step(batch)
    assert not info.skipped
    p = info.coefs[0]
    s = info.seeds[0]
    zm = opt.zm
    for name, param in zm.trainable_parameters().items():
        u = D.direction(s, zm.pids[name], param.shape, "rademacher")
        expected = (before[name].float() - 1e-2 * (p * u)).to(torch.bfloat16)
        assert torch.equal(param.detach(), expected), name


def test_learning_rate_schedules():
    model, batch = tiny_llama(torch.float32), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.MeZO(zm, lr=1.0, lr_schedule=lambda step: 1e-3 / (step + 1))
    assert [opt.step(batch).lr for _ in range(3)] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    opt = zo_fx.FZOO(zm, lr=1e-3, n_directions=2)
    opt.lr_schedule = torch.optim.lr_scheduler.StepLR(opt.torch_optimizer, step_size=1, gamma=0.5)
    assert [opt.step(batch).lr for _ in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_state_dict_refuses_a_different_optimizer():
    model, batch = tiny_llama(torch.float32), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    state = zo_fx.MeZO(zm, lr=1e-3).state_dict()
    json.dumps(state)  # plain JSON
    with pytest.raises(ValueError, match="saved by 'mezo'"):
        zo_fx.FZOO(zm, lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="eps"):
        zo_fx.MeZO(zm, lr=1e-3, eps=0.5).load_state_dict(state)


# ---- the two-dimensional problems of the AdaMeZO paper (section 5.1) ---------------------------------

BUDGET = 1800  # forward passes
# each method's best learning rate of the grid {MeZO: 3e-4, 1e-3, 2e-3, 4e-3; FZOO: 0.03, 0.1, 0.3, 1;
# AdaMeZO: 3e-5, 1e-4, 3e-4, 1e-3} with a linear decay, found by that sweep; MeZO gets its best of three
TOY_LR = {"fzoo": 0.3, "adamezo": 3e-4}
MEZO_LRS = (1e-3, 2e-3, 4e-3)


def _toy_run(name, method, lr):
    objective, start = TOYS[name]
    model, batch = Toy2D(objective, start), toy_batch()
    zm = zo_fx.zo_compile(model, batch, loss=identity_loss)
    groups = 9 if method == "fzoo" else 2
    steps = BUDGET // groups
    kwargs = {"n_directions": 8} if method == "fzoo" else {}
    cls = {"mezo": zo_fx.MeZO, "fzoo": zo_fx.FZOO, "adamezo": zo_fx.AdaMeZO}[method]
    opt = cls(zm, lr=lr, eps=1e-3, seed=1, lr_schedule=lambda t: lr * (1 - t / steps), **kwargs)
    for _ in range(steps):
        opt.step(batch)
    with torch.no_grad():
        return float(objective(model.theta[0], model.theta[1]))


@pytest.mark.slow  # 15 s each: hundreds of steps (./run.sh test -m slow)
@pytest.mark.parametrize("name", sorted(TOYS))
def test_adamezo_and_fzoo_end_lower_than_mezo_on_toy_problems(name):
    mezo = min(v for v in (_toy_run(name, "mezo", lr) for lr in MEZO_LRS) if math.isfinite(v))
    fzoo = _toy_run(name, "fzoo", TOY_LR["fzoo"])
    adamezo = _toy_run(name, "adamezo", TOY_LR["adamezo"])
    print(f"{name}: MeZO {mezo:.4g}, FZOO {fzoo:.4g}, AdaMeZO {adamezo:.4g} after {BUDGET} forward passes")
    assert fzoo < mezo and adamezo < mezo
