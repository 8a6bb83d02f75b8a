"""Low-rank directions: each matrix moves along ``A B^T / sqrt(r)``, formed by no forward pass.

Exactness of the forward against explicitly perturbed models is in ``test_compile.py`` and
``test_compile_zoo.py`` (the ``lowrank:*`` kinds); here: the frozen factor layout, the update
against the naive dense formula, the optimizers, replay, and that no forward forms a
weight-sized direction.
"""

from __future__ import annotations

import pytest
import torch
from close import assert_bitwise_equal, assert_rel_close
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_llama

import zo_fx
from zo_fx import kernels
from zo_fx.kernels import lowrank
from zo_fx.streams import GroupTable
from zo_fx.streams.layout import factor_signs, lowrank_direction, lowrank_factors, rademacher
from zo_fx.streams.philox import philox_words


def test_factor_signs_follow_the_frozen_layout():
    """Entry (i, t) of factor f is element i*r + t of the Rademacher expansion of Philox with stream tag 2 + f."""
    seed, pid, count = (7 << 32) + 123, 99, 300
    for factor in (0, 1):
        got = factor_signs([seed], pid, count, factor, dtype=torch.int64)[0]
        k = torch.arange(count, dtype=torch.int64)
        blocks = k // 128
        words = philox_words(blocks, torch.zeros_like(blocks), torch.tensor(7), torch.tensor(2 + factor),
                             torch.tensor(123), torch.tensor(pid))
        word = torch.stack(words, -1).gather(1, ((k % 128) // 32).unsqueeze(1)).squeeze(1)
        expected = 1 - 2 * ((word >> (k % 32)) & 1)
        assert torch.equal(got, expected)
    a, b = factor_signs([seed], pid, 40, 0)[0], factor_signs([seed], pid, 40, 1)[0]
    assert not torch.equal(a, b) and not torch.equal(a, rademacher(seed, pid, 0, 40)), "A, B, and u are apart"


def test_the_dense_direction_has_rank_r_and_unit_elements_on_average():
    for rank in (1, 2, 4):
        u = lowrank_direction(5, 11, (64, 48), rank, dtype=torch.float64)
        assert torch.linalg.matrix_rank(u) == rank
        assert abs(float((u * u).mean()) - 1.0) < 0.15
        assert float(u.abs().max()) <= rank ** 0.5 + 1e-12


def test_kind_and_rank_are_checked_and_kept_canonical():
    assert GroupTable([1], [1.0], 1e-3, "lowrank", rank=4).kind == "lowrank:4"
    assert GroupTable([1], [1.0], 1e-3, "lowrank").rank == 1
    assert GroupTable([1], [1.0], 1e-3).rank is None
    for kind, rank, message in (("lowrank", 0, "rank must be an integer in"), ("rademacher", 2, "rank=2 is for low"),
                                ("lowrank:2", 3, "has rank 2, but rank=3"), ("lowrank:x", None, "must be an integer"),
                                ("sparse", None, "unknown direction kind")):
        with pytest.raises(ValueError, match=message):
            GroupTable([1], [1.0], 1e-3, kind, rank=rank)
    config = zo_fx.FZOOConfig(lr=1e-3, kind="lowrank", rank=2)
    assert (config.kind, config.rank) == ("lowrank:2", 2)
    assert zo_fx.FZOOConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_update_equals_the_naive_dense_formula(dtype):
    g = torch.Generator().manual_seed(3)
    param = torch.randn(70, 33, generator=g, dtype=torch.float64).to(dtype)
    seeds, coefs, lr, wd = [4, 2**63 + 5, 17], [0.5, -1.25, 2.0], 0.01, 0.1
    dense = sum(c * lowrank_direction(s, 8, param.shape, 3, dtype=torch.float64) for s, c in zip(seeds, coefs))
    expected = param.double() - lr * (dense + wd * param.double())
    got = kernels.fused_update_(param.clone(), seeds, coefs, 8, "lowrank:3", lr, wd)
    if dtype == torch.float64:
        assert_rel_close(got, expected, 1e-12)
    elif dtype == torch.float32:  # accumulated in float32 and rounded once: a few ulps of the weights' scale
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    else:  # rounded once to bfloat16 from the float32 result: within half a bfloat16 ulp
        torch.testing.assert_close(got.double(), expected, rtol=2.0**-8 * 1.01, atol=1e-6)
    vector = torch.randn(33, generator=g, dtype=dtype)
    assert_bitwise_equal(kernels.fused_update_(vector.clone(), seeds, coefs, 8, "lowrank:3", lr, wd),
                         kernels.fused_update_(vector.clone(), seeds, coefs, 8, "rademacher", lr, wd),
                         what="a vector under low-rank directions takes the Rademacher update")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_tiles_do_not_change_the_update(dtype, monkeypatch):
    g = torch.Generator().manual_seed(4)
    param = torch.randn(70, 33, generator=g, dtype=torch.float64).to(dtype)
    seeds, coefs = [4, 2**63 + 5], [0.5, -1.25]
    for wd in (0.0, 0.1):
        whole = kernels.fused_update_(param.clone(), seeds, coefs, 8, "lowrank:2", 0.01, wd)
        with monkeypatch.context() as m:
            m.setattr(lowrank, "TILE_NUMEL", 33 * 16)  # tiles of 16 rows, the last one of 6
            tiled = kernels.fused_update_(param.clone(), seeds, coefs, 8, "lowrank:2", 0.01, wd)
        assert_bitwise_equal(tiled, whole, what=f"row tiles, weight decay {wd}")


def test_the_adamezo_update_equals_its_formula_on_dense_directions():
    g = torch.Generator().manual_seed(4)
    param = torch.randn(20, 12, generator=g, dtype=torch.float64)
    seeds, coefs, lr, betas, wd, scale, adam_eps = [3, 9, 27], [0.3, -0.7, 1.1], 1e-3, (0.7, 0.9), 0.05, 100.0, 1e-5
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    for j, (s, c) in enumerate(zip(seeds, coefs)):
        gj = c * lowrank_direction(s, 2, param.shape, 2, dtype=torch.float64)
        m += betas[0] ** j * gj
        v += betas[1] ** j * gj * gj
    expected = param - lr * (scale * m / (v.sqrt() + adam_eps) + wd * param)
    got = kernels.adamezo_update_(param.clone(), seeds, coefs, 2, "lowrank:2", lr, betas, wd, scale, adam_eps)
    assert_rel_close(got, expected, 1e-12)


def test_a_sharded_update_is_refused_under_low_rank_directions():
    with pytest.raises(ValueError, match="low-rank directions update whole parameters"):
        kernels.fused_update_(torch.zeros(64), [1], [1.0], 3, "lowrank:2", 0.1, start=64, total=256)


def _shapes_allocated(fn, params) -> list[tuple]:
    """Shapes of the tensors the ops make while ``fn`` runs, views of the parameters (``W.t()``) left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []
    storages = {p.untyped_storage().data_ptr() for p in params}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                    shapes.append(tuple(t.shape))
            return out

    with Record():
        fn()
    return shapes


def test_no_forward_forms_a_weight_sized_direction():
    model = tiny_llama(tied=False)
    batch = causal_batch(batch_size=5, seq_len=9)
    zm = zo_fx.zo_compile(model, batch)
    params = list(zm.trainable_parameters().values())
    matrices = {tuple(p.shape) for p in params if p.dim() == 2}
    weight_like = matrices | {s[::-1] for s in matrices}
    table = GroupTable([0, 11, 11, 12], [0.0, 1.0, -1.0, 1.0], 1e-3, "lowrank", rank=2)
    zm.group_losses(batch, table)  # compile outside the recorder
    formed = [s for s in _shapes_allocated(lambda: zm.group_losses(batch, table), params) if s[-2:] in weight_like]
    assert not formed, f"weight-sized tensors formed in a low-rank forward: {formed}"
    dense = [s for s in _shapes_allocated(lambda: zm.direction(11, "lowrank", rank=2), params) if s[-2:] in weight_like]
    assert dense, "the recorder sees a dense direction when one is formed"


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["fzoo", "adamezo", "zoadam", pytest.param("mezo", marks=SLOW),
                                    pytest.param("es", marks=SLOW), pytest.param("zosgd_momentum", marks=SLOW)])
def test_every_method_steps_and_replays_bit_exactly_under_low_rank_directions(method):
    torch.manual_seed(0)
    model = tiny_llama()
    batch = causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {"n_directions": 3} if method in ("fzoo", "es") else {}
    opt = zo_fx.build_optimizer(method, zm, lr=1e-3, kind="lowrank", rank=2, **settings)
    for _ in range(3):
        opt.step(batch)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved, "three steps moved the weights"
    trajectory = opt.trajectory
    assert trajectory.kind == "lowrank:2"
    fresh = tiny_llama()
    zo_fx.replay(fresh, zo_fx.Trajectory.from_dict(trajectory.to_dict()))
    for n, p in fresh.named_parameters():
        assert_bitwise_equal(p, dict(model.named_parameters())[n], what=f"replayed {n}")


@pytest.mark.parametrize("method", ["fzoo", "adamezo", pytest.param("mezo", marks=SLOW),
                                    pytest.param("es", marks=SLOW)])
def test_lr_zero_leaves_the_weights_bit_identical(method):
    model = tiny_llama()
    batch = causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {"n_directions": 3} if method in ("fzoo", "es") else {}
    opt = zo_fx.build_optimizer(method, zm, lr=0.0, kind="lowrank", rank=4, **settings)
    for _ in range(2):
        opt.step(batch)
    for n, p in model.named_parameters():
        assert_bitwise_equal(p, start[n], what=n)


def test_a_classification_readout_perturbs_only_the_label_rows_exactly():
    from explicit import explicit_group_losses

    for tied in (True, False):
        model = tiny_llama(tied=tied)
        batch = {k: v for k, v in causal_batch().items() if k != "labels"}
        batch["class_labels"] = torch.tensor([1, 0, 2])
        loss = zo_fx.CandidateClassificationLoss([7, 30, 55])
        zm = zo_fx.zo_compile(model, batch, loss=loss)
        table = GroupTable([0, 4, 4, 9], [0.0, 1.0, -1.0, 0.25], 1e-2, "lowrank", rank=3)
        got = zm.group_losses(batch, table)
        assert_rel_close(got, explicit_group_losses(model, zm, batch, table, loss), 1e-10)
        full = zo_fx.zo_compile(model, batch, loss=loss, fuse_head=False).group_losses(batch, table)
        assert_rel_close(got, full, 1e-10)


def test_the_factor_cache_returns_the_generated_factors_and_stays_bounded(monkeypatch):
    from zo_fx.kernels import lowrank
    from zo_fx.kernels._slab_cache import SlabCache
    from zo_fx.streams.layout import lowrank_factors

    slab = 4096  # bytes: each set below (two factors of 2 x 6 x 2 and 2 x 4 x 2 float32) takes 192 of them
    monkeypatch.setattr(lowrank, "_factor_cache", SlabCache(budget_bytes=2 * slab, slab_bytes=slab,
                                                            first_slab_bytes=slab))
    for pid in range(50):
        a, b = lowrank.factors([7, 9], pid, (6, 4), 2, torch.float32, "cpu")
        fresh = lowrank_factors([7, 9], pid, (6, 4), 2)
        assert torch.equal(a, fresh[0]) and torch.equal(b, fresh[1])
    cache = lowrank._factor_cache
    assert cache.slabs() == 2 and 0 < len(cache) <= 2 * slab // 192  # whole slabs evicted, oldest first
    assert cache.get(((7, 9), 0, (6, 4), 2, torch.float32, "cpu", False)) is None
    again = lowrank.factors([7, 9], 49, (6, 4), 2, torch.float32, "cpu")
    assert again[0] is lowrank.factors([7, 9], 49, (6, 4), 2, torch.float32, "cpu")[0]
    storages = {t.untyped_storage().data_ptr() for key in list(cache._entries) for t in cache.get(key)}
    assert len(storages) == 2  # the kept factors live in the two slabs, not in allocations of their own
    big = lowrank.factors([7, 9], 0, (300, 200), 2, torch.float32, "cpu")  # over a quarter slab: not kept
    assert torch.equal(big[0], lowrank_factors([7, 9], 0, (300, 200), 2)[0]) and len(cache) <= 2 * slab // 192


def test_cache_slabs_start_small_and_double_up_to_the_largest():
    from zo_fx.kernels._slab_cache import SlabCache

    cache = SlabCache(budget_bytes=1 << 16, slab_bytes=1 << 14, first_slab_bytes=1 << 12)
    for i in range(200):
        cache.put(i, (torch.full((240,), float(i)),))  # 960 bytes, 1024 with the alignment
    sizes = [storage.numel() for storage, _ in cache._slabs.values()]
    assert sizes[-1] == 1 << 14 and cache.nbytes() <= 1 << 16
    assert torch.equal(cache.get(199)[0], torch.full((240,), 199.0)) and cache.get(0) is None
    fresh = SlabCache(budget_bytes=1 << 16, slab_bytes=1 << 14, first_slab_bytes=1 << 12)
    fresh.put("a", (torch.zeros(10),))
    assert fresh.nbytes() == 1 << 12  # a small model's cache stays small


# ---------------------------------------------------------------- lazy factors (LOZO)


def test_lazy_factors_share_b_between_seeds_with_the_same_high_bits_and_draw_a_from_the_whole_seed():
    high = 0x1234_5678 << 32
    seeds = [high | 7, high | 99, (0x0BAD_CAFE << 32) | 7]
    a, b = lowrank_factors(seeds, 3, (40, 24), 2, dtype=torch.float64, lazy=True)
    assert torch.equal(b[0], b[1]) and not torch.equal(b[0], b[2])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    eager_a, eager_b = lowrank_factors(seeds, 3, (40, 24), 2, dtype=torch.float64)
    assert torch.equal(a, eager_a), "A is the same stream under both kinds"
    assert torch.equal(b[0], lowrank_factors([high], 3, (40, 24), 2, dtype=torch.float64)[1][0])
    dense = lowrank_direction(seeds[1], 3, (40, 24), 2, dtype=torch.float64, lazy=True)
    assert_bitwise_equal(dense, (a[1] @ b[1].t()) / 2**0.5, what="lazy dense direction")


def test_lazy_group_losses_equal_the_explicitly_perturbed_model():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    high = 0x0123_4567 << 32
    table = GroupTable([high | 5, high | 5, high | 6, 77], [0.0, 1.0, -1.0, 0.5], 1e-3, "lowrank:2:lazy")
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table), 1e-10,
                     what="lazy low-rank")
    assert not torch.equal(zm.group_losses(batch, table), zm.group_losses(
        batch, GroupTable(table.seeds, table.coefs, 1e-3, "lowrank:2"))), "the lazy kind is another direction"


def test_lazy_steps_keep_b_for_their_window_and_draw_a_fresh_every_step():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.FZOO(zm, lr=0.0, n_directions=2, kind="lowrank", rank=2, lazy_steps=3)
    assert opt.kind == "lowrank:2:lazy"
    seeds = []
    for _ in range(6):
        seeds.append(opt.step_seeds(2))
        opt.step(batch)
    b_seed = [[s >> 32 for s in step] for step in seeds]
    assert b_seed[0] == b_seed[1] == b_seed[2] and b_seed[3] == b_seed[4] == b_seed[5] and b_seed[0] != b_seed[3]
    assert b_seed[0][0] != b_seed[0][1], "each direction of a step has its own B"
    assert len({s[0] & 0xFFFFFFFF for s in seeds}) == 6, "A is fresh every step"
    with pytest.raises(ValueError, match="lazy_steps=3 keeps a low-rank factor"):
        zo_fx.FZOOConfig(lr=1e-3, lazy_steps=3)


def test_a_lazy_run_replays_bit_exactly():
    torch.manual_seed(0)
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    opt = zo_fx.FZOO(zm, lr=1e-3, n_directions=2, kind="lowrank", rank=2, lazy_steps=2)
    for _ in range(3):
        opt.step(batch)
    fresh = tiny_llama()
    zo_fx.replay(fresh, zo_fx.Trajectory.from_dict(opt.trajectory.to_dict()))
    for n, p in fresh.named_parameters():
        assert_bitwise_equal(p, dict(model.named_parameters())[n], what=f"replayed {n}")
