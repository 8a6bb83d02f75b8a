"""The native CPU kernels (zo_fx/kernels/native) against the torch references they replace.

Rademacher tiles, updates and embedding rows must equal the torch functions bit for bit in
every dtype (float32, float64, bfloat16, float16), on ragged sizes, from offsets inside a
Philox block, for 1 to 9 groups, with shared seeds (MeZO's +/- pair) and zero scales.
Gaussian values come from the kernel's own Box-Muller (its own float32 log, cos and sin, each
within 1 ulp of correctly rounded): they must be within a few float32 ulps of the torch reference (what
docs/directions.md allows across implementations), and the tiles and updates made from them
must equal, bit for bit, the torch operations applied to those same values. Results must not
depend on the thread count, and ZO_FX_NATIVE=0 must give the torch path's numbers (Rademacher
exactly, Gaussian within the ulps).

Tensors are tiny: the whole file runs in a few seconds after the one-off build.
"""

import warnings

import pytest
import torch

from zo_fx.kernels import blocked, embedding, native, update
from zo_fx.streams import layout
from zo_fx.streams.layout import key_tensors

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels not built here: {native.info()}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["rademacher", "gaussian"]
SEEDS = [5, 2**40 + 3, 2**64 - 5, 11, 5, 7, 2**33, 9, 11]  # 5 and 11 repeat: shared directions
SCALES = [1e-1, -1e-1, 0.0, 3e-2, -7e-2, 1e-3, 2.0, -5.0, 0.0]  # zero scales included
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
#: the most float32 ulps a native Gaussian value may differ from the torch reference's (docs/native.md)
GAUSSIAN_ULPS = 4


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    diff = (_bits(got) != _bits(want)).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}"


def float32_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many float32 values lie between ``a`` and ``b``, element by element."""

    def ordered(t):
        bits = t.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _tile_args(groups: int, kind: str, block0: int, pid: int = 2**31 + 7):
    seeds = SEEDS[:groups]
    distinct = sorted(set(seeds))
    lo, hi, pid_t, tag = key_tensors(distinct, pid, kind)
    which = torch.tensor([distinct.index(s) for s in seeds])
    scales = torch.tensor(SCALES[:groups], dtype=torch.float64)
    return scales, which, torch.tensor(block0), lo, hi, pid_t, tag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_perturbed_tiles_equal_the_torch_function(dtype, kind, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    # ragged sizes: one element, a Philox block plus change, many batches of the kernel plus a tail
    for n, block0, groups in [(1, 0, 1), (131, 3, 2), (37 * 131, 2**33 + 5, 5), (5000, 7, 9)]:
        base = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        args = _tile_args(groups, kind, block0)
        got = native.perturbed_tiles(base, *args, kind)
        want = blocked._perturbed_tiles_torch(base, *args, kind)  # eager: the kernel's Box-Muller values
        assert_bits_equal(got, want, f"{kind} tiles {dtype} n={n} G={groups}")
        if kind == "gaussian" and dtype == torch.float64:  # and within a few ulps of torch's own log/cos/sin
            with monkeypatch.context() as torch_only:
                torch_only.setenv("ZO_FX_NATIVE", "0")
                torch_tiles = blocked._perturbed_tiles_torch(base, *args, kind)
            scales = args[0].unsqueeze(1)
            safe = torch.where(scales == 0, 1.0, scales)
            ulps = float32_ulps((got - base) / safe, (torch_tiles - base) / safe)
            assert int(ulps.max()) <= GAUSSIAN_ULPS, f"float64 tiles n={n}: {int(ulps.max())} ulps"
        for g in range(groups):
            if SCALES[g] == 0.0:
                assert_bits_equal(got[g], base, "a zero-scale group is the plain weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_tiles_that_start_inside_a_philox_block(dtype, kind):
    """Element ``skip + t`` of the stream from block0: the same values as a tile from the block's start."""
    n, groups = 700, 3
    per = layout.per_block(kind)
    base = torch.randn(n + per, dtype=torch.float64).to(dtype)
    args = _tile_args(groups, kind, 9)
    whole = blocked._perturbed_tiles_torch(base, *args, kind)
    for skip in sorted({1, per // 2, per - 1}):
        got = native.perturbed_tiles(base[skip : skip + n], *args, kind, None, skip)
        assert_bits_equal(got, whole[:, skip : skip + n], f"{kind} {dtype} skip={skip}")


def test_gaussian_values_are_within_a_few_ulps_of_the_torch_reference(monkeypatch):
    """The kernel's Box-Muller against torch's log/sqrt/cos/sin, over 3 x 2**16 values of several streams."""
    worst, identical, total = 0, 0, 0
    for seed, pid, start in [(1, 0, 0), (2**40 + 3, 77, 1), (2**64 - 5, 2**31 + 7, 4097 * 4 + 3)]:
        got = native.gaussian_values(seed, pid, start, 1 << 16)
        assert_bits_equal(layout.gaussian(seed, pid, start, 1 << 16), got, "the eager layout uses the kernel's values")
        with monkeypatch.context() as torch_only:
            torch_only.setenv("ZO_FX_NATIVE", "0")
            want = layout.gaussian(seed, pid, start, 1 << 16)
        ulps = float32_ulps(got, want)
        worst, identical, total = max(worst, int(ulps.max())), identical + int((ulps == 0).sum()), total + ulps.numel()
        # random access: a range starting anywhere is the same values as the longer range's tail
        assert_bits_equal(native.gaussian_values(seed, pid, start + 5, 1000), got[5:1005], "offset range")
    assert worst <= GAUSSIAN_ULPS, f"{worst} ulps from the torch reference"
    assert identical / total > 0.5, f"only {identical}/{total} values bit-identical to the torch reference"


@pytest.mark.parametrize("groups", range(1, 10))
def test_one_to_nine_groups_and_a_reused_buffer(groups):
    base = torch.randn(3 * 2048 + 77)
    args = _tile_args(groups, "rademacher", 4)
    want = blocked._perturbed_tiles_torch(base, *args, "rademacher")
    buffer = torch.full((groups, base.numel()), float("nan"))
    got = native.perturbed_tiles(base, *args, "rademacher", buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert_bits_equal(got, want, f"G={groups}")


def test_mezo_pair_is_one_direction_with_both_signs():
    base = torch.zeros(300, dtype=torch.float64)
    lo, hi, pid, tag = key_tensors([42], 3, "rademacher")
    out = native.perturbed_tiles(base, torch.tensor([1e-3, -1e-3], dtype=torch.float64), torch.tensor([0, 0]),
                                 torch.tensor(0), lo, hi, pid, tag, "rademacher")
    assert_bits_equal(out[0], -out[1], "+eps and -eps")
    assert_bits_equal(out[0], 1e-3 * layout.rademacher(42, 3, 0, 300, dtype=torch.float64), "the stream")


def _update_both(dtype, kind, n, skip, k, wd, block0=5):
    gen = torch.Generator().manual_seed(n + k)
    p = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    seeds = SEEDS[:k]
    coefs = torch.tensor([0.37, -1.3, 2.1, 0.0, 1e-3, 5.0, -6.0, 7.0, 8.0][:k], dtype=torch.float64)
    lo, hi, pid, tag = key_tensors(seeds, 9, kind)
    got = p.clone()
    assert native.update_(got, coefs, 1e-2, wd, block0, skip, lo, hi, pid, tag, kind)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    extra = (skip,) if skip else ()
    want = update._update_chunk(p.clone(), coefs, f64(1e-2), f64(wd), torch.tensor(block0), lo, hi, pid, tag, kind,
                                *extra)
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_update_equals_the_torch_chunk(dtype, kind):
    per = layout.per_block(kind)
    for n, skip, k, wd in [(1, 0, 1, 0.0), (2048 + 131, 0, 3, 0.1), (999, per - 1, 9, 0.0), (257, 1, 0, 0.5)]:
        got, want = _update_both(dtype, kind, n, skip, k, wd)
        assert_bits_equal(got, want, f"{kind} update {dtype} n={n} skip={skip} K={k} wd={wd}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_reference_update_with_native_on_and_off(kind, monkeypatch):
    """fused_update_reference_ (sharded too) gives the same numbers whether the native path runs or not."""
    p0 = torch.randn(3 * 128 + 50, dtype=torch.float32)
    seeds, coefs = [3, 2**40 + 1, 3], [0.5, -0.25, 1.5]

    def run(start, stop):
        p = p0[start:stop].clone()
        update.fused_update_reference_(p, seeds, coefs, 77, kind, 1e-2, 0.01, chunk=256, start=start,
                                       total=p0.numel())
        return p

    on = [run(0, p0.numel()), run(130, 300)]
    monkeypatch.setenv("ZO_FX_NATIVE", "0")
    assert not native.usable(p0)
    off = [run(0, p0.numel()), run(130, 300)]
    for a, b, before in zip(on, off, [p0, p0[130:300]]):
        if kind == "rademacher":
            assert_bits_equal(a, b, f"{kind} reference update, native on vs off")
        else:  # the steps agree to the values' few float32 ulps
            torch.testing.assert_close(a - before, b - before, rtol=1e-5, atol=1e-7)
    assert_bits_equal(on[1], on[0][130:300], "a shard equals the same elements of the whole update")


@pytest.mark.parametrize("dim", [131, 2500])  # rows start anywhere inside a block; 2500 spans two pieces
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_rows_equal_the_reference(dtype, dim, monkeypatch):
    table = torch.randn(37, dim, dtype=torch.float64).to(dtype)
    ids = torch.tensor([[0, 36, 5], [5, 17, 1]])
    seeds, scales = [7, 2**40 + 1, 7, 9], [1e-2, 0.0, -1e-2, 0.5]
    got = embedding.grouped_embedding_reference(table, ids, 99, seeds, scales, "rademacher")
    monkeypatch.setenv("ZO_FX_NATIVE", "0")
    want = embedding.grouped_embedding_reference(table, ids, 99, seeds, scales, "rademacher")
    assert_bits_equal(got, want, f"embedding {dtype}")


@pytest.mark.parametrize("dim", [131, 2500])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_embedding_rows_equal_the_reference_on_the_same_values(dtype, dim, monkeypatch):
    """The kernel's rows against the reference's torch arithmetic on the same (the kernel's) values."""
    table = torch.randn(37, dim, dtype=torch.float64).to(dtype)
    ids = torch.tensor([[0, 36, 5], [5, 17, 1]])
    seeds, scales = [7, 2**40 + 1, 7, 9], [1e-2, 0.0, -1e-2, 0.5]
    calls = []
    real = native.embedding
    monkeypatch.setattr(native, "embedding", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    got = embedding.grouped_embedding_reference(table, ids, 99, seeds, scales, "gaussian")
    assert calls == ["gaussian"], "the Gaussian rows did not go through the native kernel"
    monkeypatch.setattr(embedding, "_native", lambda *a: None)  # the torch arithmetic, values still the kernel's
    want = embedding.grouped_embedding_reference(table, ids, 99, seeds, scales, "gaussian")
    assert_bits_equal(got, want, f"gaussian embedding {dtype}")


@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_the_thread_count(kind, monkeypatch):
    base = torch.randn(5 * 2048 + 300)
    args = _tile_args(4, kind, 11)
    lo, hi, pid, tag = key_tensors(SEEDS[:4], 9, kind)
    coefs = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    results = []
    for count in ("1", "2", "3"):
        monkeypatch.setenv("ZO_FX_NATIVE_THREADS", count)
        p = base.clone()
        native.update_(p, coefs, 1e-2, 0.1, 3, 0, lo, hi, pid, tag, kind)
        results.append((native.perturbed_tiles(base, *args, kind), p))
    for tiles, p in results[1:]:
        assert_bits_equal(tiles, results[0][0], f"{kind} tiles at several thread counts")
        assert_bits_equal(p, results[0][1], f"{kind} update at several thread counts")


@pytest.mark.parametrize("kind", KINDS)
def test_blocked_product_is_the_same_with_native_off(kind, monkeypatch):
    """The whole blocked GEMM (what a linear layer runs) with the kernel on and with ZO_FX_NATIVE=0."""
    weight = torch.randn(37, 131, dtype=torch.float64)
    x = torch.randn(5, 6, 131, dtype=torch.float64)
    seeds, scales = [0, 2**40 + 3, 2**40 + 3, 2**64 - 5, 11], [0.0, 1e-1, -1e-1, 3e-2, -7e-2]

    def run():
        return blocked.blocked_grouped_matmul(x, weight, 4, seeds, scales, kind, "out_in", shared_input=False,
                                              tile=1024)

    on = run()
    monkeypatch.setenv("ZO_FX_NATIVE", "0")
    off = run()
    if kind == "rademacher":
        assert_bits_equal(off, on, f"blocked {kind}, native on vs off")
    else:  # the perturbations agree to the values' few float32 ulps
        plain = blocked.blocked_grouped_matmul(x, weight, 4, seeds, [0.0] * len(seeds), kind, "out_in",
                                               shared_input=False, tile=1024)
        # per element the sums can cancel; over the whole output the difference is float32-ulp sized
        assert float((on - off).norm() / (on - plain).norm()) < 1e-6


def test_a_compiler_that_fails_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ZO_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library() is None
        assert native.library() is None
        assert not native.usable(torch.zeros(4))
    messages = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
    assert len(messages) == 1, messages
    assert "no-such-compiler" in messages[0]
    base = torch.randn(300)
    args = _tile_args(2, "rademacher", 0)
    assert_bits_equal(blocked._perturbed_tiles(base, *args, "rademacher"),
                      blocked._perturbed_tiles_torch(base, *args, "rademacher"), "fallback")


def test_tile_budget_is_read_from_the_machine():
    budget = blocked.tile_budget()
    assert blocked.MIN_TILE_BYTES <= budget["tile_bytes"] <= blocked.MAX_TILE_BYTES or budget["source"] != "L3"
    assert budget["tile_bytes"] & (budget["tile_bytes"] - 1) == 0
    assert budget["source"] in ("L2", "L3", "L4", "fallback", "ZO_FX_TILE_BYTES")
    assert "tile budget" in blocked.describe_tiles()


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_rank_factor_signs_equal_the_torch_stream(dtype, monkeypatch):
    for count in (1, 127, 129, 3 * 577):
        for factor in (0, 1):
            got = layout.factor_signs(SEEDS, 2**31 + 7, count, factor, dtype=dtype)
            with monkeypatch.context() as m:
                m.setattr(layout, "_signs_provider", None)
                want = layout.factor_signs(SEEDS, 2**31 + 7, count, factor, dtype=dtype)
            assert_bits_equal(got, want, f"factor {factor} signs, {count} elements")
    assert native.rademacher_signs(list(range(native.MAX_SEEDS + 1)), 3, 2, 10, dtype) is None  # torch's turn


def test_traced_or_fake_tensors_never_reach_the_kernel():
    """Under fake tensors or make_fx the Gaussian values stay torch ops: a ctypes call would escape the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    words = [torch.randint(0, 2**32, (10,), dtype=torch.int64) for _ in range(4)]
    with FakeTensorMode() as mode:
        out = layout.normals_from_columns(*(mode.from_tensor(w) for w in words))
    assert out.shape == (10, 4)
    graph = make_fx(layout.normals_from_columns)(*words).graph
    assert any(node.target == torch.ops.aten.log.default for node in graph.nodes), "the trace lost Box-Muller"
    assert native.normals_from_words(*words) is not None  # while plain eager tensors do take the kernel
