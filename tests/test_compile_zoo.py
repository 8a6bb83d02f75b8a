"""The exactness matrix over many families and PEFT methods: group losses equal explicit perturbation.

Every entry of ``zoo_more.ZOO`` (Mixtral, T5, BART, Falcon, Qwen2, Gemma, Mamba, ViT,
ResNet, ... and PEFT IA3, DoRA, LoHa, LoKr, AdaLoRA, FourierFT, OFT, BOFT, VeRA, LN
tuning) is compiled once and evaluated on random group tables with G in {1, 3, 9} and
both direction kinds, against the eager model with its weights explicitly perturbed
(``explicit.explicit_group_losses``). Float64 models must agree to 1e-10 relative; the
perturbation must visibly reach the loss (a perturbed group's losses differ from the
unperturbed group's), and no weight may change.

The models' adapters are moved off their no-op initialisation by the zoo, so a rule that
dropped one factor's perturbation would be seen here.
"""

import copy
import random
import zlib

import pytest
import torch
from close import assert_bitwise_equal, assert_rel_close
from explicit import explicit_group_losses
from torch.utils import _pytree as pytree
from zoo_more import ZOO

import zo_fx
from zo_fx.streams import GroupTable

#: float64 outputs; Mamba and Mixtral-grouped_mm compute their logits in float32
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
COEFS = [0.0, 1.0, -1.0, 0.37, -2.5, 1.0, 1.0, 0.5, -0.125]
#: entries torch.export cannot capture (a data-dependent Python loop over experts; PEFT HRA and SHiRA
#: read ``base_layer.weight.data`` inside forward, which export cannot trace): clear errors, checked below
EXPORT_FAILS = {"mixtral", "hra_llama", "shira_llama"}
CASES = sorted(set(ZOO) - EXPORT_FAILS)

_compiled: dict = {}


def _eager(model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    with torch.no_grad():
        return [t.clone() for t in pytree.tree_leaves(model(**inputs)) if isinstance(t, torch.Tensor)]


def _compile(name):
    """Compile a zoo entry once; zo_compile must leave the model as it was (deep-copyable, same eager outputs,
    same training flag)."""
    if name not in _compiled:
        make_model, make_batch, loss = ZOO[name]
        print(f"model: {name} from zoo_more (its default seed), batch: {make_batch.__name__}(seed=0)")
        model, batch = make_model(), make_batch()
        _compiled.clear()  # one model alive at a time
        before = _eager(model, batch)  # also a model's settling first forward, where it has one (RWKV)
        zm = zo_fx.zo_compile(model, batch, loss=loss)
        assert not model.training
        after = _eager(copy.deepcopy(model), batch)
        assert len(after) == len(before)
        for a, b in zip(after, before):
            assert_bitwise_equal(a, b, what=f"{name}: eager output of a deep copy after zo_compile")
        _compiled[name] = (model, batch, loss, zm)
    return _compiled[name]


def _table(groups, kind, rng: random.Random) -> GroupTable:
    seeds = [rng.randrange(2**64) for _ in range(groups)]
    if groups >= 3:
        seeds[2] = seeds[1]  # a +/- pair on one direction, as MeZO evaluates
    print(f"group table: seeds={seeds} coefs={COEFS[:groups]} eps=1e-3 kind={kind!r}")
    return GroupTable(seeds, COEFS[:groups], 1e-3, kind)


#: every entry with Rademacher directions (the rules' exactness); Gaussian and low-rank directions change only
#: what the generators give, so the default suite runs them on these (an MoE, encoder-decoders, Conv1D weights,
#: a conv net, adapters whose factors are matrices used inside other products) and -m slow on all
OTHER_KINDS_DEFAULT = {"qwen2_moe_batched_mm", "t5", "lora_gpt2", "dora_llama"}
KIND_CASES = [(name, "rademacher") for name in CASES] + [
    pytest.param(name, kind, marks=() if name in OTHER_KINDS_DEFAULT else pytest.mark.slow)
    for kind in ("gaussian", "lowrank:2") for name in CASES]


@pytest.mark.parametrize(("name", "kind"), KIND_CASES)
def test_group_losses_equal_explicitly_perturbed_model(name, kind):
    model, batch, loss, zm = _compile(name)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = random.Random(zlib.crc32(f"{name}/{kind}".encode()))
    for groups in (1, 3, 9):
        table = _table(groups, kind, rng)
        got = zm.group_losses(batch, table)
        expected = explicit_group_losses(model, zm, batch, table, loss)
        assert got.shape == expected.shape
        assert_rel_close(got, expected, REL_TOL[expected.dtype], what=f"{name} G={groups}")
        if groups > 1:
            assert not torch.equal(got[0], got[1]), "the perturbation does not reach the loss"
    for n, value in model.state_dict().items():
        assert_bitwise_equal(value, before[n], what=f"{name}: {n} after group_losses")


def test_every_trainable_tensor_has_a_rule_in_the_report():
    for name in ("dora_llama", "loha_llama", "fourierft_llama", "mixtral_batched_mm"):
        model, batch, loss, zm = _compile(name)
        report = zm.report(groups=3)
        assert report.all_covered, f"{name}: unused trainable tensors {report.uncovered}"
        assert set(report.uses) == set(zm.pids)
        print(report)


@pytest.mark.parametrize("name", sorted(EXPORT_FAILS))
def test_what_export_cannot_capture_is_a_clear_error(name):
    make_model, make_batch, loss = ZOO[name]
    with pytest.raises(zo_fx.ExportFailedError, match="What to try"):
        zo_fx.zo_compile(make_model(), make_batch(), loss=loss)
