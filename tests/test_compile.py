"""zo_compile: the rewritten graph equals the original model with explicitly perturbed weights.

Every check runs in float64 against the ORIGINAL eager model evaluated once per group
with its weights set to ``theta + eps * c_g * direction(seed_g)``.

Every random choice is seeded explicitly and printed (pytest shows a failing test's
output): the model's initialisation seed, the batch's seed and each group table, so a
failure can be rerun exactly as it happened.
"""

import math
import random
import zlib

import pytest
import torch
from close import assert_bitwise_equal, assert_close, assert_rel_close
from explicit import explicit_group_losses
from model_zoo import (
    FAMILIES,
    causal_batch,
    tiny_llama,
    tiny_lora_llama,
    tiny_prefix_tuning_llama,
    tiny_prompt_tuning_llama,
)

import zo_fx
from zo_fx.kernels import blocked
from zo_fx.kernels._chunks import COMPILE_MIN_NUMEL, accumulation_dtype
from zo_fx.kernels.perturb import SMALL_NUMEL
from zo_fx.streams import GroupTable
from zo_fx.streams.layout import per_block

REL_TOL = 1e-10
#: model_zoo's initialisation seed (every tiny model's default) and the batches' seed
MODEL_SEED = 0
BATCH_SEED = 0
#: coefficients of the random group tables: group 0 unperturbed, groups 1 and 2 one direction at +1 and -1
COEFS = [0.0, 1.0, -1.0, 0.37, -2.5, 1.0, 1.0, 0.5, -0.125]


def _model(make, *args, seed=MODEL_SEED, **kwargs):
    print(f"model: {make.__name__}(seed={seed})")
    return make(*args, seed=seed, **kwargs)


def _batch(make=causal_batch, seed=BATCH_SEED, **kwargs):
    print(f"batch: {make.__name__}({', '.join(f'{k}={v}' for k, v in {'seed': seed, **kwargs}.items())})")
    return make(seed=seed, **kwargs)


def _group_table(seeds, coefs, eps, kind="rademacher") -> GroupTable:
    """A GroupTable, printed: its seeds choose the random directions."""
    print(f"group table: seeds={list(seeds)} coefs={list(coefs)} eps={eps} kind={kind!r}")
    return GroupTable(seeds, coefs, eps, kind)


def _random_table(groups, kind, rng: random.Random) -> GroupTable:
    """``groups`` random seeds; for G >= 3 groups 1 and 2 share theirs (a +/- pair, as MeZO evaluates)."""
    seeds = [rng.randrange(2**64) for _ in range(groups)]
    if groups >= 3:
        seeds[2] = seeds[1]
    return _group_table(seeds, COEFS[:groups], 1e-3, kind)


def _shapes_allocated(fn) -> list[tuple]:
    """Shapes of every tensor the ops produce while ``fn`` runs (through a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Record():
        fn()
    return shapes


def _assert_weights_unchanged(model, before: dict, what: str) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert_bitwise_equal(after[name], value, what=f"{what}: {name}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "lowrank:1",
                                  pytest.param("lowrank:3", marks=pytest.mark.slow)])
def test_group_losses_equal_explicitly_perturbed_model(family, kind):
    make_model, make_batch = FAMILIES[family]
    print(f"model: {family} from model_zoo (initialisation seed {MODEL_SEED}, its default)")
    model, batch = make_model(), _batch(make_batch)
    zm = zo_fx.zo_compile(model, batch)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    table_seed = zlib.crc32(f"{family}/{kind}".encode())  # a different, fixed stream for every case
    print(f"group-table seeds from random.Random({table_seed})")
    rng = random.Random(table_seed)
    for groups in (1, 3, 9):
        table = _random_table(groups, kind, rng)
        losses = zm.group_losses(batch, table)
        assert losses.shape == (groups, batch["input_ids"].shape[0])
        assert_rel_close(losses, explicit_group_losses(model, zm, batch, table), REL_TOL, what=f"G={groups}")
    _assert_weights_unchanged(model, before, "after group_losses")


def test_every_parameter_is_covered_and_report_is_readable():
    model, batch = _model(tiny_llama), _batch()
    zm = zo_fx.zo_compile(model, batch)
    report = zm.report()
    assert report.all_covered
    text = str(report)
    assert "model.layers.0.self_attn.q_proj.weight" in text and "linear" in text
    # tied embedding: one parameter (one direction), used by the embedding and the LM head
    rules = {rule for _, _, rule in report.uses["model.embed_tokens.weight"]}
    assert rules == {"embedding", "linear"}
    assert "lm_head.weight" not in zm.direction(1)


def test_tied_parameter_has_one_direction_in_both_uses():
    model, batch = _model(tiny_llama), _batch()
    zm = zo_fx.zo_compile(model, batch)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = _group_table([5, 5], [1.0, -1.0], 1e-3)
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table), REL_TOL)


def test_lora_perturbs_only_lora_weights_and_frozen_prefix_runs_once():
    model, batch = _model(tiny_lora_llama), _batch()
    zm = zo_fx.zo_compile(model, batch)
    assert all("lora_" in n for n in zm.pids)
    report = zm.report(groups=3)
    assert report.frozen and all("lora_" not in n for n in report.frozen)
    layouts = zm.rewritten(3, "rademacher").node_layouts
    # the embedding and the first frozen projections do not depend on any perturbation
    assert layouts["embedding"] == "invariant"
    assert layouts["linear"] == "invariant"  # q_proj base layer of layer 0, before its LoRA branch
    assert report.layout_counts["invariant"] > 50


@pytest.mark.parametrize("make_model", [tiny_prompt_tuning_llama, tiny_prefix_tuning_llama], ids=["prompt", "prefix"])
def test_prompt_and_prefix_tuning_perturb_only_the_virtual_tokens(make_model):
    model, batch = _model(make_model), _batch()
    zm = zo_fx.zo_compile(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(zm.pids) == trainable and all("prompt_encoder" in n for n in trainable)
    table = _group_table([1, 2, 3], [0.0, 1.0, -0.5], 1e-2, "gaussian")
    losses = zm.group_losses(batch, table)
    assert not torch.equal(losses[0], losses[1]), "the virtual tokens do not reach the loss"
    assert_rel_close(losses, explicit_group_losses(model, zm, batch, table), REL_TOL)


def test_batch_of_another_size_than_the_example():
    model = _model(tiny_llama)
    zm = zo_fx.zo_compile(model, _batch(batch_size=3, seq_len=7))
    table = _group_table([9, 9, 4], [1.0, -1.0, 0.0], 1e-3)
    for b, t in ((5, 7), (2, 11), (1, 4)):
        batch = _batch(seed=b, batch_size=b, seq_len=t)
        losses = zm.group_losses(batch, table)
        assert losses.shape == (3, b)
        assert_rel_close(losses, explicit_group_losses(model, zm, batch, table), REL_TOL, what=f"B={b} T={t}")


def test_frozen_parameters_are_untouched_and_not_perturbed():
    model, batch = _model(tiny_llama, tied=False), _batch()
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)
    zm = zo_fx.zo_compile(model, batch)
    assert set(zm.pids) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("mlp" in n for n in zm.direction(1)), "a frozen parameter has a direction"
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    table = _group_table([3, 4], [1.0, -1.0], 1e-2)
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table), REL_TOL)
    _assert_weights_unchanged(model, before, "after group_losses and the explicit reference")


def test_user_loss_overrides_the_default():
    model, batch = _model(tiny_llama), _batch()

    def last_logit_sum(logits, b):  # any per-example function of the outputs is a legal loss
        return logits[:, -1].sum(-1)

    zm = zo_fx.zo_compile(model, batch, loss=last_logit_sum)
    table = _group_table([3, 3], [1.0, -1.0], 1e-2)
    expected = explicit_group_losses(model, zm, batch, table, last_logit_sum)
    assert_rel_close(zm.group_losses(batch, table), expected, REL_TOL)


def test_candidate_classification_loss():
    model, batch = _model(tiny_llama), _batch()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    batch["class_labels"] = torch.tensor([0, 1, 1])
    loss = zo_fx.CandidateClassificationLoss([10, 20])
    zm = zo_fx.zo_compile(model, batch, loss=loss)
    table = _group_table([3, 3, 0], [1.0, -1.0, 0.0], 1e-2)
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, loss), REL_TOL)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: export cannot trace it
            return self.lin(x)
        return -self.lin(x)


def test_model_that_cannot_be_exported_gives_the_documented_error():
    seed = 12  # export fails whatever the values; seeded so that the run is the same every time
    print(f"model and input: torch.manual_seed({seed}), Generator seed {seed} for x")
    torch.manual_seed(seed)
    model, x = _DataDependent(), torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(zo_fx.ExportFailedError, match=r"(?s)_DataDependent.*What to try"):
        zo_fx.zo_compile(model, {"x": x}, loss=lambda o, b: o.sum(-1))


# the torch functions that make direction values during group_losses: (module, name) -> what they generate.
# A wrapper around each tells the dispatch mode below which allocations are direction scratch.
_GENERATORS = {
    # the perturbed tiles of a linear's or the head's weight (the blocked GEMM's generator)
    ("zo_fx.kernels.blocked", "_perturbed_tiles"): "tiles",
    ("zo_fx.kernels.blocked", "tile_scratch"): "tiles",  # the kept buffer the native kernel writes the tiles into
    ("zo_fx.ops", "perturbed_groups"): "perturbed_groups",  # G copies of a norm weight / bias at once
    ("zo_fx.ops", "sample_at"): "sample_at",  # the direction at the looked-up embedding rows only
}


def _direction_scratch(fn, monkeypatch) -> dict[str, tuple[int, tuple, torch.dtype]]:
    """Run ``fn``; for each kind of generator, the largest tensor (bytes, shape, dtype) made inside it."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    inside: list[str] = []  # the generators being run, outermost first
    largest: dict[str, tuple[int, tuple, torch.dtype]] = {}

    def wrap(real, source):
        def generator(*args, **kwargs):
            inside.append(source)
            try:
                return real(*args, **kwargs)
            finally:
                inside.pop()

        return generator

    for (module, name), source in _GENERATORS.items():
        mod = importlib.import_module(module)
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name), source))  # raises if the name is gone

    from zo_fx.kernels import blocked

    blocked.clear_tile_scratch()  # a buffer kept from an earlier call would be allocated unseen

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        size = (t.numel() * t.element_size(), tuple(t.shape), t.dtype)
                        largest[inside[0]] = max(largest.get(inside[0], size), size, key=lambda r: r[0])
            return out

    with Record():
        fn()
    return largest


def _generator_bytes(kind: str, numel: int, acc_bytes: int) -> int:
    """The largest tensor the torch generators make for one direction of ``numel`` elements from element 0.

    ``numel`` fits one chunk (``_chunks.CHUNK``) and is generated eagerly, so this is what
    ``_chunks.chunk_values`` / ``batched_values`` and ``perturb.perturbed`` allocate:

    * the direction in the accumulation dtype, ``scale * u`` and ``base + scale * u``
      (the perturbed copy): ``acc_bytes`` per element;
    * Rademacher: a Philox block is 4 int64 words expanded to 128 int32 signs
      (``signs_from_words``: ``[blocks, 4, 32]``) before the cast: 4 bytes per element of
      whole 128-element blocks (the 4 words themselves, 32 bytes per block, are less);
    * Gaussian: a block is 4 normals from 4 int64 words (``[blocks, 4]``): 8 bytes per
      element of whole 4-element blocks; Box-Muller's float32 temporaries are half that.
    """
    blocks = -(-numel // per_block(kind))
    stream = 4 * 128 * blocks if kind == "rademacher" else 8 * 4 * blocks
    return max(acc_bytes * numel, stream)


def _lookup_bytes(kind: str, rows: int, dim: int) -> int:
    """The largest tensor ``sample_at`` makes for ``rows`` looked-up rows of ``dim`` elements (L = rows * dim).

    Rademacher: every element gathers the 4 int64 words of its block (``words[inverse]``,
    ``[L, 4]``) before picking its bit: 32 bytes per element. Gaussian: the int64 index
    and inverse (8 bytes per element), and the 4 int64 words of each distinct block, at
    most ``ceil(dim / 4) + 1`` blocks per row.
    """
    n = rows * dim
    if kind == "rademacher":
        return 32 * n
    return max(8 * n, 32 * rows * (-(-dim // 4) + 1))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_direction_scratch_is_one_weight_never_one_per_group(kind, monkeypatch):
    """Never a [G, out, in] tensor; the largest direction temporary is bounded by G tiles, not G weights.

    Every tensor made while a direction is generated (the G perturbed tiles of a weight,
    the per-group copies of the small parameters, the rows of a lookup) is bounded by what
    generating G tiles of ``TILE_ELEMENTS``, G directions of the largest small parameter,
    or one lookup of the batch's rows takes (bounds below). The tile is made smaller than
    the tiny model's weights, so a per-group copy of a weight would break the first bound.
    """
    tile = 128
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", tile)
    model, batch = _model(tiny_llama, tied=False), _batch()
    zm = zo_fx.zo_compile(model, batch)
    groups = 9
    table = _group_table(list(range(groups)), [1.0] * groups, 1e-3, kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if p.dim() == 2]
    small = [p for p in trainable if p.dim() == 1]
    acc_bytes = accumulation_dtype(weights[0].dtype).itemsize  # float64 model: float64 accumulation, 8 bytes
    largest_weight = max(p.numel() for p in weights)  # the untied embedding / LM head, 96 x 32
    # a tile is about `tile` elements, rounded up to whole Philox blocks; every weight spans
    # several tiles, each generated eagerly (a compiled call's temporaries are unseen here)
    largest_tile = max(blocked.tile_rows(*p.shape, kind, tile) * p.shape[1] for p in weights)
    assert largest_tile < min(p.numel() for p in weights) and groups * largest_tile < COMPILE_MIN_NUMEL
    assert all(p.numel() <= SMALL_NUMEL for p in small)  # every small parameter's G copies in one batched call
    rows, dim = batch["input_ids"].numel(), model.get_input_embeddings().weight.shape[1]
    bounds = {
        "tiles": groups * _generator_bytes(kind, largest_tile, acc_bytes),
        "perturbed_groups": groups * _generator_bytes(kind, max(p.numel() for p in small), acc_bytes),
        "sample_at": _lookup_bytes(kind, rows, dim),
    }
    assert bounds["tiles"] < groups * largest_weight * acc_bytes
    largest = _direction_scratch(lambda: zm.group_losses(batch, table), monkeypatch)
    for source, bound in bounds.items():
        print(f"{kind} {source}: largest {largest.get(source)}, bound {bound} bytes")
    for source, bound in bounds.items():
        assert source in largest, f"{source} made no direction: the test no longer sees the generation"
        assert largest[source][0] <= bound, f"{source}: {largest[source]} is over {bound} bytes"

    weight_shapes = {tuple(p.shape) for p in weights}
    shapes = _shapes_allocated(lambda: zm.group_losses(batch, table))
    assert shapes, "the dispatch mode saw no tensor"
    per_group_copies = [s for s in shapes if len(s) == 3 and s[0] == groups and s[1:] in weight_shapes]
    assert not per_group_copies, f"weights copied per group: {per_group_copies[:3]}"


@pytest.mark.slow  # about 20 s of inductor compilation (./run.sh test -m slow)
def test_inductor_backend_agrees_with_eager():
    model, batch = _model(tiny_llama, dtype=torch.float32), _batch()
    table = _group_table([1, 2, 3], [0.0, 1.0, -1.0], 1e-2)
    eager = zo_fx.zo_compile(model, batch).group_losses(batch, table)
    compiled = zo_fx.zo_compile(model, batch, backend="inductor").group_losses(batch, table)
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    model, batch = _model(tiny_llama), _batch()
    with pytest.raises(ValueError, match="impl"):
        zo_fx.zo_compile(model, batch, impl="cuda")
    with pytest.raises(TypeError, match="dict"):
        zo_fx.zo_compile(model, [batch["input_ids"]])
    with pytest.raises(ValueError, match="as many seeds"):
        GroupTable([1, 2], [1.0], 1e-3)
    frozen = _model(tiny_llama)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        zo_fx.zo_compile(frozen, batch)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "lowrank:1", "lowrank:2"])
def test_the_head_runs_a_few_groups_at_a_time_within_its_logits_budget(kind, monkeypatch):
    """No tensor holds more logits than the budget allows; the result equals the unfused graph."""
    from zo_fx import ops

    model, batch = _model(tiny_llama), _batch()
    groups, (b, t), vocab = 5, batch["input_ids"].shape, model.config.vocab_size
    table = _group_table(list(range(groups)), [0.0, 1.0, -1.0, 0.5, 2.0], 1e-3, kind)
    fused = zo_fx.zo_compile(model, batch)
    assert fused.head is not None and fused.head.weight == "model.embed_tokens.weight"
    unfused = zo_fx.zo_compile(model, batch, fuse_head=False).group_losses(batch, table)
    per_group = b * t * vocab * 8  # float64 logits of one group
    for allowed in (1, 2, groups):
        monkeypatch.setattr(ops, "head_logits_budget", lambda weight, n=allowed: n * per_group)
        result = {}
        shapes = _shapes_allocated(lambda: result.setdefault("losses", fused.group_losses(batch, table)))
        rows = [math.prod(s[:-1]) for s in shapes if s and s[-1] == vocab]
        logits = [r * vocab for r in rows if r % (b * t) == 0]  # not the head's own [D, V] view
        assert max(logits) == allowed * b * t * vocab, f"{allowed} group(s) per head call"
        assert_rel_close(result["losses"], unfused, REL_TOL, what=f"{allowed} group(s) per head call")


def test_classification_reads_out_only_label_word_rows():
    model, batch = _model(tiny_llama), _batch()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    batch["class_labels"] = torch.tensor([1, 0, 2])
    loss = zo_fx.CandidateClassificationLoss([7, 30, 55])
    table = _group_table([4, 4, 9], [1.0, -1.0, 0.25], 1e-2, "gaussian")
    readout = zo_fx.zo_compile(model, batch, loss=loss).group_losses(batch, table)
    full = zo_fx.zo_compile(model, batch, loss=loss, fuse_head=False).group_losses(batch, table)
    assert_rel_close(readout, full, REL_TOL, what="readout vs full head")
    fused = zo_fx.zo_compile(model, batch, loss=loss)
    expected = explicit_group_losses(model, fused, batch, table, loss)
    assert_rel_close(readout, expected, REL_TOL, what="readout vs explicit")
