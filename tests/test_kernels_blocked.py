"""The cache-blocked grouped GEMM (the CPU torch path) against the per-group perturbed linear.

The reference is :func:`zo_fx.kernels.linear.grouped_linear_reference`: one whole
perturbed weight per group, one GEMM each. The blocked path must give the same products
up to the GEMM's summation order, whatever the tile size (tiles much smaller than the
weight, one row of blocks, larger than the weight), for both weight layouts, shared and
per-group inputs, groups that share a seed (MeZO), zero scales (FZOO's group 0) and a
frozen weight, in float64 (1e-12) and float32 (1e-5).
"""

import pytest
import torch
from close import assert_close

from zo_fx import ops
from zo_fx.kernels import blocked
from zo_fx.kernels.linear import grouped_linear_reference
from zo_fx.streams import GroupTable
from zo_fx.streams.layout import per_block

KINDS = ["rademacher", "gaussian"]
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
# a [37, 131] weight: no tile shape divides it, rows cross Rademacher blocks (131 > 128, odd)
RAGGED = (37, 131)


def _case(shape, dtype, seed):
    """A weight of ``shape`` and the generator that made it (for the inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), gen


def _inputs(gen, groups, rows, k, dtype, shared):
    size = (rows, k) if shared else (groups, rows, k)
    return torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tile", [128, 1024, 1 << 18])
def test_blocked_product_equals_one_perturbed_weight_per_group(kind, dtype, layout, shared, tile):
    weight, gen = _case(RAGGED, dtype, seed=tile)
    k = RAGGED[1] if layout == "out_in" else RAGGED[0]
    x = _inputs(gen, 5, 6, k, dtype, shared)
    # FZOO-like: group 0 plain; MeZO-like: groups 1 and 2 share a seed with opposite scales
    seeds = [0, 2**40 + 3, 2**40 + 3, 2**64 - 5, 11]
    scales = [0.0, 1e-1, -1e-1, 3e-2, -7e-2]
    got = blocked.blocked_grouped_matmul(x, weight, 4, seeds, scales, kind, layout, shared_input=shared, tile=tile)
    want = grouped_linear_reference(x, weight, None, 4, None, seeds, scales, kind, shared_input=shared,
                                    weight_layout=layout)
    assert_close(got, want, **TOLERANCE[dtype], what=f"blocked {layout} tile={tile}")


def test_tiles_cover_the_weight_on_philox_block_boundaries():
    for kind in KINDS:
        for rows, cols in [(37, 131), (1536, 576), (3, 5), (1, 1)]:
            step = blocked.tile_rows(rows, cols, kind, 1024)
            assert 1 <= step <= rows
            assert step == rows or (step * cols) % per_block(kind) == 0, (rows, cols, step)


@pytest.mark.parametrize("shared", [False, True])
def test_a_frozen_weight_is_one_plain_product_for_every_group(shared):
    weight, gen = _case((9, 7), torch.float64, seed=1)
    x = _inputs(gen, 3, 4, 7, torch.float64, shared)
    got = blocked.blocked_grouped_matmul(x, weight, None, [1, 2, 3], [0.5, -0.5, 0.1], "rademacher", "out_in",
                                         shared_input=shared)
    rows = [x if shared else x[g] for g in range(3)]
    for g in range(3):
        assert torch.equal(got[g], rows[g] @ weight.t())


def test_groups_sharing_a_seed_generate_its_direction_once(monkeypatch):
    """MeZO's +eps and -eps groups: one direction tile per tile, two perturbed tiles from it."""
    calls = []
    real = blocked._perturbed_tiles

    def counting(base, scales, which, block0, seed_lo, *rest):
        calls.append((seed_lo.numel(), scales.numel()))
        return real(base, scales, which, block0, seed_lo, *rest)

    monkeypatch.setattr(blocked, "_perturbed_tiles", counting)
    weight = torch.randn(64, 32, dtype=torch.float64)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    blocked.blocked_grouped_matmul(x, weight, 1, [9, 9], [1e-3, -1e-3], "gaussian", "out_in", shared_input=False,
                                   tile=512)
    assert calls and all(c == (1, 2) for c in calls), calls  # one seed generated, two groups formed
    assert len(calls) == 64 * 32 // 512


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_reused_tile_buffer_is_never_shared_with_a_result(dtype):
    """The tiles of every call are written into one kept buffer: a second call (other seeds, other
    shapes, a weight of one tile and of many) must leave the first call's result as it was, and
    each result must still equal the reference."""
    blocked.clear_tile_scratch()
    results = []
    for i, (shape, tile) in enumerate([((64, 48), None), ((37, 131), 1024), ((96, 48), None), ((64, 48), 512)]):
        weight, gen = _case(shape, dtype, seed=20 + i)
        x = _inputs(gen, 4, 5, shape[1], dtype, shared=False)
        seeds, scales = [i + 1, 2**33 + i, i + 1, 7 * i + 5], [0.1, -0.2, -0.1, 0.05]
        got = blocked.blocked_grouped_matmul(x, weight, 3, seeds, scales, "rademacher", "out_in", shared_input=False,
                                             tile=tile)
        results.append((got, got.clone(), x, weight, seeds, scales))
    for got, kept, x, weight, seeds, scales in results:
        assert torch.equal(got, kept), "a later call wrote into an earlier result"
        if dtype != torch.bfloat16:
            want = grouped_linear_reference(x, weight, None, 3, None, seeds, scales, "rademacher", shared_input=False,
                                            weight_layout="out_in")
            assert_close(got, want, **TOLERANCE[dtype], what="after the buffer's reuse")
    buffers = blocked._scratch.__dict__.get("buffers", {})
    if blocked.native.available():
        assert dtype in buffers, "the native path keeps its tile buffer between calls"
    blocked.clear_tile_scratch()
    assert not blocked._scratch.__dict__.get("buffers")


@pytest.mark.parametrize("kind", KINDS)
def test_the_graph_op_with_bias_equals_the_reference(kind):
    """ops.grouped_linear (what the rewritten graph calls) on the blocked path, with a perturbed bias."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(10, generator=gen, dtype=torch.float64)
    x = torch.randn(3 * 4, 5, 6, generator=gen, dtype=torch.float64)  # 3 groups of 4 examples of 5 tokens
    table = GroupTable([5, 6, 6], [0.0, 1.0, -1.0], 1e-2, kind)
    seeds, scales = table.tensors()
    got = ops.grouped_linear(x, weight, bias, 1, 2, seeds, scales, kind, 3, 0, impl="torch")
    want = grouped_linear_reference(x.view(3, 4, 5, 6), weight, bias, 1, 2, list(table.seeds), list(table.scales),
                                    kind, shared_input=False)
    assert_close(got, want.view(12, 5, 10), rtol=1e-12, atol=1e-12, what="ops.grouped_linear")


def test_the_head_over_a_vocabulary_of_many_tiles(monkeypatch):
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 256)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    got = ops.head_logits(x, weight, None, 3, None, 12, 1e-2, "rademacher", "out_in")
    want = grouped_linear_reference(x, weight, None, 3, None, [12], [1e-2], "rademacher", shared_input=True)[0]
    assert_close(got, want, rtol=1e-12, atol=1e-12, what="head over 19 tiles")


def test_the_tile_size_keeps_every_groups_tiles_within_the_cache_budget():
    assert blocked.tile_elements(8, 4) * 8 * 4 == blocked.TILE_BYTES  # FZOO's 8 perturbed fp32 groups: 2**19
    assert blocked.tile_elements(2, 4) == blocked.MAX_TILE  # MeZO: capped
    assert blocked.tile_elements(10_000, 8) == blocked.MIN_TILE  # many groups: never below the floor
    for groups in (1, 3, 8, 64):
        assert blocked.MIN_TILE <= blocked.tile_elements(groups, 2) <= blocked.MAX_TILE


def test_a_product_autograd_tracks_is_never_silently_detached():
    """The tiles are formed without autograd: under grad the blocked path steps aside, and the
    per-group path refuses loudly (zo_fx runs its graph under no_grad; nothing differentiates it)."""
    weight = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2 * 3, 4, dtype=torch.float64)
    assert not blocked.supports(weight, "out_in", x)
    with torch.no_grad():
        assert blocked.supports(weight, "out_in", x)
    seeds, scales = GroupTable([1, 1], [1.0, -1.0], 1e-2).tensors()
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        ops.grouped_linear(x, weight, None, 7, None, seeds, scales, "rademacher", 2, 0, impl="torch")
