"""zo_compile: the rewritten graph equals the original model with explicitly perturbed weights.

Every check runs in float64 against the ORIGINAL eager model evaluated once per group
with its weights set to ``theta + eps * c_g * direction(seed_g)``.
"""

import random

import pytest
import torch
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
from zo_fx.streams import GroupTable

REL_TOL = 1e-10


def _table(groups, kind, rng):
    seeds = [rng.randrange(2**64) for _ in range(groups)]
    coefs = [0.0, 1.0, -1.0, 0.37, -2.5, 1.0, 1.0, 0.5, -0.125][:groups]
    if groups >= 2:
        seeds[1] = seeds[0] if groups == 2 else seeds[1]
    return GroupTable(seeds, coefs, 1e-3, kind)


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


def _assert_close_rel(actual, expected):
    rel = ((actual - expected).abs() / expected.abs().clamp(min=1e-30)).max().item()
    assert rel <= REL_TOL, f"relative error {rel:.3e} > {REL_TOL}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_group_losses_equal_explicitly_perturbed_model(family, kind):
    make_model, make_batch = FAMILIES[family]
    model, batch = make_model(), make_batch()
    zm = zo_fx.zo_compile(model, batch)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = random.Random()
    for groups in (1, 3, 9):
        table = _table(groups, kind, rng)
        losses = zm.group_losses(batch, table)
        assert losses.shape == (groups, batch["input_ids"].shape[0])
        _assert_close_rel(losses, explicit_group_losses(model, zm, batch, table))
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "a weight changed"


def test_every_parameter_is_covered_and_report_is_readable():
    model, batch = tiny_llama(), causal_batch()
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
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = GroupTable([5, 5], [1.0, -1.0], 1e-3)
    _assert_close_rel(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table))


def test_lora_perturbs_only_lora_weights_and_frozen_prefix_runs_once():
    model, batch = tiny_lora_llama(), causal_batch()
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
    model, batch = make_model(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(zm.pids) == trainable and all("prompt_encoder" in n for n in trainable)
    table = GroupTable([1, 2, 3], [0.0, 1.0, -0.5], 1e-2, "gaussian")
    losses = zm.group_losses(batch, table)
    assert not torch.equal(losses[0], losses[1]), "the virtual tokens do not reach the loss"
    _assert_close_rel(losses, explicit_group_losses(model, zm, batch, table))


def test_batch_of_another_size_than_the_example():
    model = tiny_llama()
    zm = zo_fx.zo_compile(model, causal_batch(batch_size=3, seq_len=7))
    for b, t in ((5, 7), (2, 11), (1, 4)):
        batch = causal_batch(batch_size=b, seq_len=t, seed=b)
        table = GroupTable([9, 9, 4], [1.0, -1.0, 0.0], 1e-3)
        _assert_close_rel(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table))


def test_frozen_parameters_are_untouched_and_not_perturbed():
    model, batch = tiny_llama(tied=False), causal_batch()
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)
    zm = zo_fx.zo_compile(model, batch)
    assert set(zm.pids) == {n for n, p in model.named_parameters() if p.requires_grad}
    table = GroupTable([3, 4], [1.0, -1.0], 1e-2)
    _assert_close_rel(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table))


def test_user_loss_overrides_the_default():
    model, batch = tiny_llama(), causal_batch()

    def last_logit_sum(logits, b):  # any per-example function of the outputs is a legal loss
        return logits[:, -1].sum(-1)

    zm = zo_fx.zo_compile(model, batch, loss=last_logit_sum)
    table = GroupTable([3, 3], [1.0, -1.0], 1e-2)
    _assert_close_rel(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, last_logit_sum))


def test_candidate_classification_loss():
    model, batch = tiny_llama(), causal_batch()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    batch["class_labels"] = torch.tensor([0, 1, 1])
    loss = zo_fx.CandidateClassificationLoss([10, 20])
    zm = zo_fx.zo_compile(model, batch, loss=loss)
    table = GroupTable([3, 3, 0], [1.0, -1.0, 0.0], 1e-2)
    _assert_close_rel(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, loss))


class _Cumsum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x) * torch.cumsum(self.scale, 0)


def test_uncovered_parameter_use_names_node_op_and_parameter():
    model = _Cumsum().double()
    batch = {"x": torch.randn(3, 4, dtype=torch.float64)}
    zm = zo_fx.zo_compile(model, batch, loss=lambda out, b: out.sum(-1))
    with pytest.raises(zo_fx.UncoveredParameterUseError, match=r"'scale'.*cumsum.*cumsum"):
        zm.group_losses(batch, GroupTable([1, 2], [1.0, -1.0], 1e-3))
    # the documented fallback evaluates that op once per group
    zm = zo_fx.zo_compile(model, batch, loss=lambda out, b: out.sum(-1), allow_fallback=True)
    table = GroupTable([1, 2], [1.0, -1.0], 1e-3)
    got = zm.group_losses(batch, table)
    ref = []
    for s, c in zip(table.seeds, table.coefs):
        d = zm.direction(s, table.kind)
        with torch.no_grad():
            lin = torch.nn.functional.linear(batch["x"], model.lin.weight + 1e-3 * c * d["lin.weight"],
                                             model.lin.bias + 1e-3 * c * d["lin.bias"])
            ref.append((lin * torch.cumsum(model.scale + 1e-3 * c * d["scale"], 0)).sum(-1))
    _assert_close_rel(got, torch.stack(ref))
    assert "fallback" in str(zm.report())


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: export cannot trace it
            return self.lin(x)
        return -self.lin(x)


def test_model_that_cannot_be_exported_gives_the_documented_error():
    with pytest.raises(zo_fx.ExportFailedError, match=r"(?s)_DataDependent.*What to try"):
        zo_fx.zo_compile(_DataDependent(), {"x": torch.randn(3, 4)}, loss=lambda o, b: o.sum(-1))


def test_no_weight_is_copied_per_group():
    """Never a [G, out, in] tensor; never more than one perturbed weight alive at a time."""
    model, batch = tiny_llama(tied=False), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    groups = 9
    shapes = _shapes_allocated(lambda: zm.group_losses(batch, GroupTable(list(range(groups)), [1.0] * groups, 1e-3)))
    assert not any(len(s) == 3 and s[0] == groups and s[1:] in weight_shapes for s in shapes)


def test_inductor_backend_agrees_with_eager():
    model, batch = tiny_llama(dtype=torch.float32), causal_batch()
    table = GroupTable([1, 2, 3], [0.0, 1.0, -1.0], 1e-2)
    eager = zo_fx.zo_compile(model, batch).group_losses(batch, table)
    compiled = zo_fx.zo_compile(model, batch, backend="inductor").group_losses(batch, table)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    model, batch = tiny_llama(), causal_batch()
    with pytest.raises(ValueError, match="impl"):
        zo_fx.zo_compile(model, batch, impl="cuda")
    with pytest.raises(TypeError, match="dict"):
        zo_fx.zo_compile(model, [batch["input_ids"]])
    with pytest.raises(ValueError, match="as many seeds"):
        GroupTable([1, 2], [1.0], 1e-3)
    frozen = tiny_llama()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        zo_fx.zo_compile(frozen, batch)


def test_head_is_fused_into_the_loss_one_group_at_a_time():
    """No tensor holds the logits of all groups at once; the result equals the unfused graph."""
    model, batch = tiny_llama(), causal_batch()
    groups, (b, t), vocab = 5, batch["input_ids"].shape, model.config.vocab_size
    table = GroupTable(list(range(groups)), [0.0, 1.0, -1.0, 0.5, 2.0], 1e-3)
    fused = zo_fx.zo_compile(model, batch)
    assert fused.head is not None and fused.head.weight == "model.embed_tokens.weight"
    result = {}
    shapes = _shapes_allocated(lambda: result.setdefault("losses", fused.group_losses(batch, table)))
    got = result["losses"]
    assert (groups * b, t, vocab) not in shapes and (b, t, vocab) in shapes
    unfused = zo_fx.zo_compile(model, batch, fuse_head=False).group_losses(batch, table)
    _assert_close_rel(got, unfused)


def test_classification_reads_out_only_label_word_rows():
    model, batch = tiny_llama(), causal_batch()
    batch = {k: v for k, v in batch.items() if k != "labels"}
    batch["class_labels"] = torch.tensor([1, 0, 2])
    loss = zo_fx.CandidateClassificationLoss([7, 30, 55])
    table = GroupTable([4, 4, 9], [1.0, -1.0, 0.25], 1e-2, "gaussian")
    readout = zo_fx.zo_compile(model, batch, loss=loss).group_losses(batch, table)
    full = zo_fx.zo_compile(model, batch, loss=loss, fuse_head=False).group_losses(batch, table)
    _assert_close_rel(readout, full)
    fused = zo_fx.zo_compile(model, batch, loss=loss)
    _assert_close_rel(readout, explicit_group_losses(model, fused, batch, table, loss))
