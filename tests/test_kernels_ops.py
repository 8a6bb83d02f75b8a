"""Every Triton kernel against the torch reference beside it, and the impl="auto"/"torch"/"triton" choice.

Without a GPU the kernels run in Triton's CPU interpreter on small ragged shapes; on a
GPU (``benchmarks/gpu_kernels.sh``) the same cases run compiled on CUDA tensors. The
interpreter runs every program one by one in numpy: keep new cases small (this file's
run time is watched).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from close import assert_bitwise_equal, assert_close, assert_equal, assert_within
from triton_interpreter import device_for_kernels  # noqa: E402 (before zo_fx.kernels is imported)

DEVICE = device_for_kernels()

from zo_fx import kernels  # noqa: E402
from zo_fx.kernels.embedding import grouped_embedding, grouped_embedding_reference  # noqa: E402
from zo_fx.kernels.linear import grouped_linear, grouped_linear_reference  # noqa: E402
from zo_fx.kernels.update import (  # noqa: E402
    adamezo_update_,
    adamezo_update_reference_,
    fused_update_,
    fused_update_reference_,
)
from zo_fx.streams import layout as D  # noqa: E402

KINDS = ["rademacher", "gaussian"]
# the kernel and the reference round the same float32 values once; what remains is the
# float32 accumulation order (and, for Gaussian directions, a few ulps of log/cos/sin)
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),  # ~2 ulps (2**-8..2**-7 relative each)
    torch.float16: dict(rtol=1e-3, atol=1e-3),  # ~2 ulps (2**-11..2**-10 relative each)
}
# on both sides of 2**32, as the key split needs, and at its edges (2**32 - 1, 2**32)
SEEDS = [7, 2**40 + 3, 2**64 - 5, 11, 2**33, 2**32 - 1, 2**32]
SCALES = [1e-1, 0.0, -5e-2, 3e-2, -1e-3, 7e-2, -2e-2]
# a shape no tile size divides: a [37, 131] weight / table (neither 37 nor 131 a multiple of 4 or 32,
# 131 > 128: rows cross Rademacher blocks), read by 5 x 3 rows
RAGGED_WEIGHT = (37, 131)
RAGGED_ROWS = (5, 3)


@pytest.fixture(autouse=True)
def _kernels_really_run():
    assert kernels.pick("triton", torch.zeros(1, device=DEVICE)) == "triton", (
        "Triton cannot run: vacuous test"
    )


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _linear_case(m, n, k, g, dtype, layout, shared, bias, seed=0):
    """Inputs of one grouped_linear case; ``bias`` is "perturbed", "frozen" or None."""
    torch.manual_seed(seed)
    x = _randn(m, k, dtype=dtype) if shared else _randn(g, m, k, dtype=dtype)
    weight = _randn(k, n, dtype=dtype) if layout == "conv1d" else _randn(n, k, dtype=dtype)
    b = _randn(n, dtype=dtype) if bias else None
    return x, weight, b, 0x5EED, (0xB1A5 if bias == "perturbed" else None)


def _check_linear(x, weight, bias, w_pid, b_pid, g, kind, *, shared, layout, dtype):
    args = (x, weight, bias, w_pid, b_pid, SEEDS[:g], SCALES[:g], kind)
    opts = dict(shared_input=shared, weight_layout="in_out" if layout == "conv1d" else "out_in")
    out = grouped_linear(*args, **opts, impl="triton")
    what = f"grouped_linear G={g} {kind} {layout} shared={shared} {dtype}"
    assert_close(out, grouped_linear_reference(*args, **opts), **TOLERANCE[dtype], what=what)
    return out


# --------------------------------------------------------------------------- grouped_linear


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-group-x", "shared-x"])
def test_grouped_linear_matches_reference(kind, dtype, layout, shared):
    # ragged rows (37) and a ragged dimension (70) beside a stored row length of 64
    m, n, k = (37, 70, 64) if layout == "linear" else (37, 64, 70)
    x, w, b, w_pid, b_pid = _linear_case(m, n, k, 3, dtype, layout, shared, "perturbed")
    _check_linear(x, w, b, w_pid, b_pid, 3, kind, shared=shared, layout=layout, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("m, n, k", [(20, 64, 64), (1, 32, 128), (9, 36, 68), (37, 70, 45)])
def test_grouped_linear_shapes_on_and_off_the_aligned_direction_path(kind, layout, m, n, k):
    """Stored rows whose length is a multiple of 32 (Rademacher) / 4 (Gaussian) take the per-word
    path, the others the per-element one (45 and 70 neither; 68 and 36 Gaussian only)."""
    x, w, b, w_pid, b_pid = _linear_case(m, n, k, 2, torch.bfloat16, layout, False, "perturbed", seed=1)
    _check_linear(x, w, b, w_pid, b_pid, 2, kind, shared=False, layout=layout, dtype=torch.bfloat16)


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["perturbed-W", "frozen-W"])
@pytest.mark.parametrize("bias", ["perturbed", "frozen", None])
@pytest.mark.parametrize("shared", [False, True], ids=["per-group-x", "shared-x"])
def test_grouped_linear_frozen_and_missing_tensors(frozen_weight, bias, shared):
    x, w, b, w_pid, b_pid = _linear_case(24, 40, 64, 3, torch.float32, "linear", shared, bias, seed=2)
    w_pid = None if frozen_weight else w_pid
    _check_linear(x, w, b, w_pid, b_pid, 3, "rademacher", shared=shared, layout="linear", dtype=torch.float32)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_a_group_with_scale_zero_is_the_plain_linear(layout):
    x, w, b, w_pid, b_pid = _linear_case(30, 50, 40, 3, torch.float32, layout, False, "perturbed", seed=3)
    out = grouped_linear(x, w, b, w_pid, b_pid, [1, 2, 3], [0.5, 0.0, -0.5], "gaussian",
                         shared_input=False, weight_layout="in_out" if layout == "conv1d" else "out_in",
                         impl="triton")  # fmt: skip
    plain = F.linear(x[1], w.T if layout == "conv1d" else w, b)
    assert_close(out[1], plain, **TOLERANCE[torch.float32], what="group 1 (scale 0) vs F.linear")
    moved = (out[0] - F.linear(x[0], w.T if layout == "conv1d" else w, b)).abs().max().item()
    assert moved > 1e-2, f"group 0 (scale 0.5) is within {moved:.2e} of the plain linear: not perturbed"


@pytest.mark.parametrize("g, frozen_weight", [(5, False), (6, True)])
def test_more_groups_than_one_program_holds(g, frozen_weight):
    """5 groups: pairs, the last slot repeats group 4 and is masked; 6 groups sharing one product."""
    x, w, b, w_pid, b_pid = _linear_case(17, 33, 40, g, torch.float32, "linear", True, "perturbed", seed=4)
    w_pid = None if frozen_weight else w_pid
    _check_linear(x, w, b, w_pid, b_pid, g, "rademacher", shared=True, layout="linear", dtype=torch.float32)


def test_grouped_linear_keeps_leading_row_dimensions():
    torch.manual_seed(5)
    x, w = _randn(2, 3, 5, 24), _randn(16, 24)
    out = grouped_linear(
        x, w, None, 9, None, [1, 2], [0.1, -0.1], "rademacher", shared_input=False, impl="triton"
    )
    assert out.shape == (2, 3, 5, 16)
    ref = grouped_linear_reference(x, w, None, 9, None, [1, 2], [0.1, -0.1], "rademacher", shared_input=False)
    assert_close(out, ref, **TOLERANCE[torch.float32])


RAGGED_LINEAR = [  # (groups, layout, shared input, kind): each G with both layouts, both inputs and both kinds
    (1, "linear", True, "rademacher"),
    (1, "linear", False, "gaussian"),
    (1, "conv1d", True, "gaussian"),
    (1, "conv1d", False, "rademacher"),
    (7, "linear", True, "gaussian"),
    (7, "linear", False, "rademacher"),
    (7, "conv1d", True, "rademacher"),
    (7, "conv1d", False, "gaussian"),
]


@pytest.mark.parametrize(
    "g, layout, shared, kind", RAGGED_LINEAR, ids=[f"G{g}-{lay}-{'shared' if sh else 'per-group'}-x-{k}"
                                                   for g, lay, sh, k in RAGGED_LINEAR]
)
def test_grouped_linear_one_and_seven_groups_on_a_ragged_shape(g, layout, shared, kind):
    """One group (a single slot of a pair) and seven (three pairs and a masked slot) on a [37, 131] weight."""
    torch.manual_seed(10)
    weight = _randn(*RAGGED_WEIGHT)  # linear: N=37, K=131; conv1d (in_out): K=37, N=131
    k, n = (weight.shape[1], weight.shape[0]) if layout == "linear" else weight.shape
    x = _randn(*RAGGED_ROWS, k) if shared else _randn(g, *RAGGED_ROWS, k)
    bias = _randn(n)
    out = _check_linear(x, weight, bias, 0x5EED, 0xB1A5, g, kind, shared=shared, layout=layout, dtype=torch.float32)
    assert out.shape == (g, *RAGGED_ROWS, n)


def test_grouped_linear_bad_arguments():
    x, w = torch.zeros(2, 3, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="seeds but"):
        grouped_linear(x, w, None, 1, None, [1, 2], [0.1], "rademacher", shared_input=False)
    with pytest.raises(ValueError, match="shared_input=True"):
        grouped_linear(x, w, None, 1, None, [1, 2, 3], [0.1] * 3, "rademacher", shared_input=False)
    with pytest.raises(ValueError, match="weight_layout must be one of"):
        grouped_linear(
            x, w, None, 1, None, [1, 2], [0.1] * 2, "rademacher", shared_input=False, weight_layout="nk"
        )
    with pytest.raises(ValueError, match="must match dimension 1"):
        grouped_linear(
            x, torch.zeros(4, 7), None, 1, None, [1, 2], [0.1] * 2, "rademacher", shared_input=False
        )
    with pytest.raises(TypeError, match="cast one"):
        grouped_linear(x, w.double(), None, 1, None, [1, 2], [0.1] * 2, "rademacher", shared_input=False)
    with pytest.raises(ValueError, match="unknown direction kind"):
        grouped_linear(x, w, None, 1, None, [1, 2], [0.1] * 2, "uniform", shared_input=False)


# --------------------------------------------------------------------------- updates


def _update_bound(p0: torch.Tensor, expected: torch.Tensor, lr: float, step_size: float) -> torch.Tensor:
    """How far the kernel's ``p0 - lr * step`` may be from the reference's, elementwise.

    float32: rounding the result (a few ulps of |p|) plus 2**-18 of the largest possible
    step (its terms carry a few ulps each, Gaussian directions a few more). Lower
    precision rounds (nearly) the same float32 value once: one ulp of the result.
    """
    eps = torch.finfo(p0.dtype).eps
    if p0.dtype != torch.float32:
        return eps * expected.abs().float()
    return 4 * eps * p0.abs() + 2**-18 * lr * step_size


def _check_fused_update(p, seeds, coefs, kind, lr, wd):
    p0 = p.clone()
    fused_update_(p, seeds, coefs, 1234, kind, lr, wd, impl="triton")
    expected = fused_update_reference_(p0.clone(), seeds, coefs, 1234, kind, lr, wd)
    step_size = sum(abs(c) for c in coefs) * 6.0 + wd * float(p0.abs().max())  # |u| < 6 for both kinds
    bound = _update_bound(p0, expected, lr, step_size)
    what = f"fused_update_ {len(seeds)} directions {kind} {p.dtype} {tuple(p.shape)}"
    assert_within(p.float(), expected.float(), bound, what=what)


def _check_adamezo_update(p, seeds, coefs, kind, lr, scale=100.0):
    p0 = p.clone()
    adamezo_update_(p, seeds, coefs, 55, kind, lr, (0.7, 0.9), 0.01, scale, impl="triton")
    expected = adamezo_update_reference_(p0.clone(), seeds, coefs, 55, kind, lr, (0.7, 0.9), 0.01, scale)
    # |scale * m / sqrt(v)| <= scale * sqrt(K) (Cauchy-Schwarz, as b1^2 <= b2): bound by scale * K
    bound = _update_bound(p0, expected, lr, scale * len(seeds))
    what = f"adamezo_update_ {len(seeds)} directions {kind} {p.dtype} {tuple(p.shape)}"
    assert_within(p.float(), expected.float(), bound, what=what)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_update_matches_apply_update(kind, dtype):
    torch.manual_seed(6)
    p = _randn(3, 1001, dtype=dtype)  # 3003 elements: the last program is ragged
    _check_fused_update(p, SEEDS[:4], [0.3, -1.7, 2.5, 1e-3], kind, lr=0.05, wd=0.1)


def test_fused_update_without_directions_only_decays():
    p = _randn(300)
    p0 = p.clone()
    fused_update_(p, [], [], 1, "rademacher", lr=0.1, weight_decay=0.5, impl="triton")
    assert_close(p, p0 * (1 - 0.1 * 0.5), rtol=1e-6, atol=0, what="weight decay only")
    decayed = p.clone()
    # no direction and no weight decay: a no-op, for the kernel and the reference alike
    assert fused_update_(p, [], [], 1, "rademacher", lr=0.1, weight_decay=0.0, impl="triton") is p
    assert_bitwise_equal(p, decayed, what="fused_update_ without directions or weight decay")
    assert fused_update_reference_(p, [], [], 1, "rademacher", lr=0.1, weight_decay=0.0) is p
    assert_bitwise_equal(p, decayed, what="fused_update_reference_ without directions or weight decay")


def test_adamezo_reference_is_the_formula():
    """m = sum b1^j c_j u_j, v = sum b2^j c_j^2 u_j^2, most recent direction first, in float64."""
    torch.manual_seed(7)
    p = torch.randn(5, 77, dtype=torch.float64)
    seeds, coefs, (b1, b2), lr, wd = [4, 5, 6], [0.5, -2.0, 1.5], (0.7, 0.9), 1e-3, 0.01
    u = [D.direction(s, 321, p.shape, "gaussian", dtype=torch.float64) for s in seeds]
    m = sum(b1**j * c * uj for j, (c, uj) in enumerate(zip(coefs, u)))
    v = sum(b2**j * c**2 * uj**2 for j, (c, uj) in enumerate(zip(coefs, u)))
    expected = p - lr * (100.0 * m / (v.sqrt() + 1e-5) + wd * p)
    adamezo_update_reference_(p, seeds, coefs, 321, "gaussian", lr, (b1, b2), wd, chunk=128)
    assert_close(p, expected, rtol=1e-12, atol=1e-14, what="adamezo_update_reference_ vs the formula")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adamezo_update_matches_reference(kind, dtype):
    torch.manual_seed(8)
    p = _randn(2, 1500, dtype=dtype)
    _check_adamezo_update(p, SEEDS[:5], [0.9, -0.4, 1.3, 0.05, -2.0], kind, lr=1e-3)


RAGGED_UPDATES = [  # (update, directions, kind): each update with one and seven directions, both kinds
    ("fused", 1, "gaussian"),
    ("fused", 7, "rademacher"),
    ("adamezo", 1, "rademacher"),
    ("adamezo", 7, "gaussian"),
]


@pytest.mark.parametrize("update, k, kind", RAGGED_UPDATES, ids=[f"{u}-K{k}-{kind}" for u, k, kind in RAGGED_UPDATES])
def test_updates_with_one_and_seven_directions_on_a_ragged_parameter(update, k, kind):
    torch.manual_seed(11)
    p = _randn(*RAGGED_WEIGHT)  # 4847 elements: the last program is ragged, rows cross blocks
    coefs = [0.3, -1.7, 2.5, 1e-3, -0.8, 0.6, -1.1][:k]
    if update == "fused":
        _check_fused_update(p, SEEDS[:k], coefs, kind, lr=0.05, wd=0.1)
    else:
        _check_adamezo_update(p, SEEDS[:k], coefs, kind, lr=1e-3)


def test_update_bad_arguments():
    with pytest.raises(ValueError, match="seeds but"):
        fused_update_(torch.zeros(4), [1, 2], [1.0], 1, "rademacher", 0.1, impl="triton")
    with pytest.raises(ValueError, match="contiguous"):
        fused_update_(torch.zeros(4, 4).T, [1], [1.0], 1, "rademacher", 0.1, impl="triton")
    with pytest.raises(ValueError, match="betas"):
        adamezo_update_(torch.zeros(4), [1], [1.0], 1, "gaussian", 0.1, (0.9,))


# --------------------------------------------------------------------------- grouped_embedding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 70, 36])  # aligned for both kinds / neither / Gaussian only
def test_grouped_embedding_matches_reference(kind, dtype, d):
    torch.manual_seed(9)
    weight = _randn(50, d, dtype=dtype)
    ids = torch.randint(0, 50, (3, 11), device=DEVICE)
    out = grouped_embedding(weight, ids, 99, SEEDS[:3], SCALES[:3], kind, impl="triton")
    expected = grouped_embedding_reference(weight, ids, 99, SEEDS[:3], SCALES[:3], kind)
    assert out.shape == (3, 3, 11, d)
    _check_embedding(out, expected, kind, dtype, what=f"grouped_embedding {kind} {dtype} D={d}")
    assert_equal(out[1], weight[ids], what="scale 0: the plain lookup")


def _check_embedding(out, expected, kind, dtype, what):
    if kind == "rademacher":  # same float32 value, rounded once the same way
        assert_equal(out, expected, what=what)
    else:
        assert_close(out, expected, **TOLERANCE[dtype], what=what)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g", [1, 7])
def test_grouped_embedding_one_and_seven_groups_on_a_ragged_table(kind, g):
    torch.manual_seed(12)
    weight = _randn(*RAGGED_WEIGHT)  # V=37 rows of D=131: unaligned for both kinds
    ids = torch.randint(0, weight.shape[0], RAGGED_ROWS, device=DEVICE)
    out = grouped_embedding(weight, ids, 99, SEEDS[:g], SCALES[:g], kind, impl="triton")
    assert out.shape == (g, *RAGGED_ROWS, weight.shape[1])
    expected = grouped_embedding_reference(weight, ids, 99, SEEDS[:g], SCALES[:g], kind)
    _check_embedding(out, expected, kind, torch.float32, what=f"grouped_embedding G={g} {kind} on {RAGGED_WEIGHT}")
    for i in (i for i in range(g) if SCALES[i] == 0.0):
        assert_equal(out[i], weight[ids], what=f"group {i} (scale 0): the plain lookup")


def test_embedding_reference_generates_only_the_rows_it_reads():
    """A row's perturbation is the table-wide direction at that row, whatever else is looked up."""
    weight = torch.zeros(1000, 8)
    out = grouped_embedding_reference(weight, torch.tensor([999, 3]), 5, [77], [1.0], "rademacher")
    full = D.direction(77, 5, weight.shape, "rademacher")
    assert_equal(out[0], full[[999, 3]])


@pytest.mark.skipif(
    DEVICE == "cuda", reason="on CUDA the check is a device-side assert, fatal to the process"
)
def test_grouped_embedding_refuses_ids_outside_the_table():
    with pytest.raises(RuntimeError, match="outside"):
        grouped_embedding(torch.zeros(5, 32), torch.tensor([5]), 1, [1], [1.0], "rademacher", impl="triton")


# --------------------------------------------------------------------------- choosing an implementation


@pytest.fixture
def fresh_notices():
    kernels.dispatch._warned.clear()
    yield
    kernels.dispatch._warned.clear()


def test_pick_rules(fresh_notices):
    cpu = torch.zeros(2)
    assert kernels.pick("torch", cpu) == "torch"
    assert kernels.pick("auto", cpu) == "torch"  # auto uses Triton on CUDA tensors only
    assert kernels.triton_available()
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.pick("cuda", cpu)
    with pytest.warns(UserWarning, match="float64"):
        assert kernels.pick("triton", torch.zeros(2, dtype=torch.float64, device=DEVICE)) == "torch"
    with torch.no_grad():
        assert kernels.pick("triton", torch.zeros(2, device=DEVICE, requires_grad=True)) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_takes_the_kernels_for_cuda_tensors(fresh_notices):
    cuda = torch.zeros(2, device="cuda")
    assert kernels.pick("auto", cuda) == "triton"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falls back quietly: float64 stays on the reference
        assert kernels.pick("auto", cuda.double()) == "torch"


def test_a_weight_autograd_tracks_stays_on_the_differentiable_reference(fresh_notices):
    x, w = _randn(2, 3, 16), _randn(8, 16).requires_grad_()
    with pytest.warns(UserWarning, match="no backward"):
        out = grouped_linear(
            x, w, None, 1, None, [1, 2], [0.1, -0.1], "rademacher", shared_input=False, impl="triton"
        )
    assert out.requires_grad


def test_impl_triton_on_cpu_without_the_interpreter_falls_back_once_with_a_notice(fresh_notices, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, w_pid, b_pid = _linear_case(4, 8, 16, 2, torch.float32, "linear", False, "perturbed")
    x, w, b = x.cpu(), w.cpu(), b.cpu()
    args = (x, w, b, w_pid, b_pid, [1, 2], [0.1, -0.1], "rademacher")
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        out = grouped_linear(*args, shared_input=False, impl="triton")
    assert_equal(out, grouped_linear_reference(*args, shared_input=False), what="the fallback")  # never wrong
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback for the same reason is quiet
        grouped_linear(*args, shared_input=False, impl="triton")


def test_without_triton_the_references_still_import_and_run():
    script = """
import sys, warnings
sys.modules["triton"] = None  # as if Triton were not installed
import torch
from zo_fx import kernels
from zo_fx.kernels.linear import grouped_linear, grouped_linear_reference
assert not kernels.triton_available()
x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = grouped_linear(x, w, None, 1, None, [1, 2], [0.1, -0.1], "gaussian",
                         shared_input=False, impl="triton")
assert "Triton is not installed" in str(caught[0].message), caught
ref = grouped_linear_reference(x, w, None, 1, None, [1, 2], [0.1, -0.1], "gaussian", shared_input=False)
assert torch.equal(out, ref)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
