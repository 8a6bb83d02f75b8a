"""The rewrite rules one by one: what each covers, what it refuses, and that nothing is dropped silently.

Small hand-written modules isolate one shape of dependency each (an op that mixes the
examples, a parameter-only subgraph, an in-place write, a random op, a batch key the
model does not take); each is checked in float64 against the module run with its
parameters explicitly perturbed.
"""

import pytest
import torch
from close import assert_rel_close
from explicit import explicit_group_losses
from model_zoo import causal_batch, tiny_llama
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from zoo_more import ZOO, tiny_dora_llama, tiny_loha_llama

import zo_fx
from zo_fx.passes.rules import RULES
from zo_fx.streams import GroupTable

REL_TOL = 1e-10
SEED = 21


def _sum_loss(out, batch):
    return out.reshape(out.shape[0], -1).sum(-1)


def _explicit(model, zm, batch, table, loss=_sum_loss):
    """The module itself, once per group, with its trainable parameters set to theta + eps*c*u."""
    return explicit_group_losses(model, zm, batch, table, loss)


def _x(batch_size=4, dim=6):
    print(f"x: torch.Generator().manual_seed({SEED}), shape [{batch_size}, 5, {dim}]")
    return torch.randn(batch_size, 5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))


def _module(cls):
    print(f"module: {cls.__name__}, torch.manual_seed({SEED}) for its parameters")
    torch.manual_seed(SEED)
    return cls().double().eval()


TABLE = GroupTable([3, 3, 0, 8], [1.0, -1.0, 0.0, 0.5], 1e-2)


class MixesExamples(torch.nn.Module):
    """Batch statistics and a sort across examples: each group must see only its own slice."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        centred = h - h.mean(0, keepdim=True)
        ranked = torch.sort(h, dim=0).values
        order = torch.argsort(h[:, 0, 0])  # routing: examples reordered by a value
        return centred + ranked + h[order]


class ParameterOnly(torch.nn.Module):
    """A weight built from parameters alone by ops no matmul rule knows: kron, cumsum, an FFT, index_put."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(2, 3))
        self.b = torch.nn.Parameter(torch.randn(3, 2))
        self.spectrum = torch.nn.Parameter(torch.randn(4))
        self.register_buffer("positions", torch.tensor([0, 2, 3, 5]))

    def forward(self, x):
        w = torch.kron(self.a, self.b)  # [6, 6]
        w = w + torch.cumsum(self.a, 1).sum() * torch.eye(6, dtype=w.dtype)
        dense = torch.zeros(6, dtype=w.dtype)
        dense[self.positions] = self.spectrum  # an in-place write into a fresh buffer
        return x @ w.T + torch.fft.irfft(torch.fft.rfft(dense), n=6)


class TransposedWeight(torch.nn.Module):
    """Falcon-style ``x @ W.T`` and a weight used through a reshape: folded into the linear rule."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6))
        self.flat = torch.nn.Parameter(torch.randn(36))

    def forward(self, x):
        return x @ self.w.T + torch.nn.functional.linear(x, self.flat.view(6, 6))


class SequenceFirst(torch.nn.Module):
    """torch's own transformer in its [T, B, D] layout: the batch in dim 1 all the way through."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.encoder(x.transpose(0, 1))).transpose(0, 1)


class Recurrent(torch.nn.Module):
    """LSTM and GRU: their weights enter one fused op (a list of parameters) that runs per group."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 5, batch_first=True)
        self.gru = torch.nn.GRU(5, 4, batch_first=True, num_layers=2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.gru(h)[0][:, -1]


class PairedExamples(torch.nn.Module):
    """Examples combined in pairs through a reshape of the batch dim: the groups must not be paired up."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        pairs = h.reshape(h.shape[0] // 2, 2, *h.shape[1:])
        return (pairs * pairs.flip(1)).reshape(h.shape)


@pytest.mark.parametrize("cls", [MixesExamples, ParameterOnly, TransposedWeight, SequenceFirst, Recurrent,
                                 PairedExamples])
def test_hand_written_shapes_of_dependency_are_exact(cls):
    model, batch = _module(cls), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    got = zm.group_losses(batch, TABLE)
    assert_rel_close(got, _explicit(model, zm, batch, TABLE), REL_TOL)
    assert not torch.equal(got[0], got[2]), "the perturbation does not reach the loss"
    print(zm.report(groups=4))


def test_transposed_and_reshaped_weights_are_folded_not_copied_per_group():
    model, batch = _module(TransposedWeight), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    rules = {name: {rule for _, _, rule in uses} for name, uses in zm.report(groups=4).uses.items()}
    assert rules == {"w": {"linear (folded views)"}, "flat": {"linear (folded views)"}}


def test_ops_that_mix_examples_run_per_group():
    model, batch = _module(MixesExamples), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    rw = zm.rewritten(4, "rademacher")
    by_op = {name: rw.node_rules[name] for name in rw.node_rules}
    mixing = [n for n in by_op if n.startswith(("mean", "sort", "argsort", "index"))]
    assert mixing and all(by_op[n] == "per-group" for n in mixing), by_op


class BatchLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(x).sum()  # one number for the whole batch: the groups cannot be told apart


def test_an_output_that_mixes_the_batch_is_an_error():
    model, batch = _module(BatchLoss), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=lambda out, b: out.reshape(1))
    with pytest.raises(zo_fx.UnsupportedGraphError, match="no single batch dimension"):
        zm.group_losses(batch, TABLE)


class RandomScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(6))

    def forward(self, x):
        return x * (self.scale + torch.rand_like(self.scale))


def test_a_use_no_rule_covers_lists_every_rules_reason():
    model, batch = _module(RandomScale), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    with pytest.raises(zo_fx.UncoveredParameterUseError) as err:
        zm.group_losses(batch, TABLE)
    message = str(err.value)
    print(message)
    assert "'scale'" in message and "rand" in message
    for name, _ in RULES:
        assert f"  {name}: " in message, f"rule {name} gave no reason"
    assert "random numbers" in message


def test_an_unknown_batch_key_is_an_error_naming_it():
    model, batch = tiny_llama(), causal_batch()
    batch = {**batch, "foo": torch.zeros(3, 7, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"\['foo'\].*loss_keys"):
        zo_fx.zo_compile(model, batch)
    zm = zo_fx.zo_compile(model, batch, loss_keys=["foo"])  # declared loss-only: accepted, not passed
    assert "foo" not in zm.captured.input_keys


def test_a_key_the_model_takes_but_ignores_is_an_error():
    class IgnoresMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, x, mask=None):
            return self.lin(x)

    model, batch = _module(IgnoresMask), {"x": _x(), "mask": torch.ones(4, 5)}
    with pytest.raises(ValueError, match="'mask' reaches no op"):
        zo_fx.zo_compile(model, batch, loss=_sum_loss)


def test_bart_decoder_inputs_reach_the_graph():
    make_model, make_batch, loss = ZOO["bart"]
    model, batch = make_model(), make_batch()
    zm = zo_fx.zo_compile(model, batch, loss=loss)
    assert {"input_ids", "attention_mask", "decoder_input_ids"} <= set(zm.captured.input_keys)
    out = zm.outputs(batch)
    assert out.shape[:2] == batch["decoder_input_ids"].shape, "the output has the encoder's length"
    with torch.no_grad():
        eager = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert_rel_close(out, eager, REL_TOL)


def _largest_new_tensors(fn) -> list[tuple[int, tuple]]:
    """(numel, shape) of every tensor an op makes while ``fn`` runs (views of an input excluded)."""
    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = pytree.tree_flatten((args, kwargs))[0]
            storages = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor)}
            for t in pytree.tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                    made.append((t.numel(), tuple(t.shape)))
            return out

    with Record():
        fn()
    return sorted(made, reverse=True)


@pytest.mark.parametrize("make_model", [tiny_dora_llama, tiny_loha_llama], ids=["dora", "loha"])
def test_adapted_weights_exist_one_group_at_a_time(make_model):
    """With G = 9 the largest tensor made during group_losses is about one adapted weight, not nine.

    B = 1, T = 2 keeps every activation smaller than the adapted q_proj weight (32 x 32),
    so the bound speaks of the weights: nine adapted copies at once would be 9216 elements.
    """
    model, batch = make_model(), causal_batch(batch_size=1, seq_len=2)
    zm = zo_fx.zo_compile(model, batch)
    groups = 9
    table = GroupTable(list(range(groups)), [1.0] * groups, 1e-3)
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    made = _largest_new_tensors(lambda: zm.group_losses(batch, table))
    print(f"largest tensors made: {made[:5]}; adapted weight {tuple(weight.shape)}")
    assert any(shape == tuple(weight.shape) for _, shape in made), "no adapted weight was formed: test sees nothing"
    assert made[0][0] <= 2 * weight.numel(), f"{made[0]} is more than about one adapted weight"


def test_the_postcondition_catches_a_parameter_read_unperturbed(monkeypatch):
    """A rule that copied a parameter use as it is would evaluate every group at the plain weights."""
    import zo_fx.passes.rewrite as rewrite

    def copy_as_is(node, ctx):
        return lambda: ctx.set(node, ctx.copy(node, lambda a: ctx.new[a]), "invariant")

    monkeypatch.setattr(rewrite, "RULES", [("copy-as-is", copy_as_is)])
    model, batch = _module(TransposedWeight), {"x": _x()}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    with pytest.raises(AssertionError, match="postcondition: parameter 'w' is read unperturbed"):
        zm.group_losses(batch, TABLE)


def test_a_run_time_batch_unlike_the_compiled_one_is_refused():
    model, batch = tiny_llama(), causal_batch()
    zm = zo_fx.zo_compile(model, batch)
    with pytest.raises(ValueError, match=r"missing \['attention_mask'\]"):
        zm.group_losses({k: v for k, v in batch.items() if k != "attention_mask"}, TABLE)
    with pytest.raises(ValueError, match=r"not taken by the graph \['foo'\]"):
        zm.group_losses({**batch, "foo": batch["input_ids"]}, TABLE)
    with pytest.raises(ValueError, match="batch size 0"):
        zm.group_losses({k: v[:0] for k, v in batch.items()}, TABLE)
    with pytest.raises(ValueError, match="torch.int32 with 2 dims; the graph was compiled for torch.int64"):
        zm.group_losses({**batch, "input_ids": batch["input_ids"].int()}, TABLE)
    model.float()
    with pytest.raises(ValueError, match="compile the model again after changing its dtype"):
        zm.group_losses(batch, TABLE)


def test_a_loss_that_is_not_per_example_is_a_clear_error():
    model, batch = tiny_llama(), causal_batch()
    for fuse_head in (True, False):
        zm = zo_fx.zo_compile(model, batch, loss=lambda logits, b: logits.mean(), fuse_head=fuse_head)
        with pytest.raises(ValueError, match="one value per example"):
            zm.group_losses(batch, TABLE)
