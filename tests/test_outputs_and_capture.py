"""Outputs beyond logits, a capture that leaves the model as it was, and refusals that say what to do.

* A loss receives the model's own output object when the output has no ``logits``
  (span QA) or when asked (``outputs="all"``); tensors without a leading batch dimension
  are left out and rebuilt as None, never mixed over the groups.
* The built-in losses of span QA, multiple choice, regression and multi-label heads
  average to the heads' own loss.
* ``zo_compile`` puts every module back as it found it: attributes written during the
  trace, training flag, hooks.
* A model whose first eval forward changes its own weights is settled by one eager
  forward (with a warning) or refused; data-dependent control flow is named as such.
"""

import random
import warnings

import pytest
import torch
from close import assert_bitwise_equal, assert_rel_close
from explicit import explicit_group_losses
from torch import nn
from zoo_more import (
    choice_batch,
    class_batch,
    regression_batch,
    span_batch,
    tiny_bert_multiple_choice,
    tiny_electra_regression,
    tiny_funnel,
    tiny_roberta_qa,
)

import zo_fx
from zo_fx.losses import default_loss, multi_label_loss, multiple_choice_loss, regression_loss, span_qa_loss
from zo_fx.streams import GroupTable


def _table(groups=3, seed=0):
    rng = random.Random(seed)
    seeds = [rng.randrange(2**63) for _ in range(groups)]
    return GroupTable(seeds, [0.0, 1.0, -1.0, 0.5][:groups], 1e-3, "rademacher")


# ---------------------------------------------------------------- built-in losses against the heads' own


def _own_loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss


def test_span_qa_loss_averages_to_the_qa_heads_own_loss():
    model, batch = tiny_roberta_qa(), span_batch(batch_size=4)
    batch["start_positions"][-1], batch["end_positions"][-1] = 2, 3  # every span inside: the head averages all
    with torch.no_grad():
        per_example = span_qa_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    assert per_example.shape == (4,)
    assert_rel_close(per_example.mean(), _own_loss(model, batch), 1e-12, what="span QA")


def test_span_qa_loss_ignores_a_span_past_the_sequence():
    model, batch = tiny_roberta_qa(), span_batch(batch_size=3)  # the last span lies past the sequence
    with torch.no_grad():
        per_example = span_qa_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    assert per_example[-1] == 0 and bool((per_example[:-1] > 0).all())


@pytest.mark.parametrize(("make_model", "make_batch", "loss"), [
    (tiny_bert_multiple_choice, choice_batch, multiple_choice_loss),
    (tiny_electra_regression, regression_batch, regression_loss),
])
def test_head_losses_average_to_the_heads_own_loss(make_model, make_batch, loss):
    model, batch = make_model(), make_batch()
    assert default_loss(model) is loss
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_rel_close(loss(logits, batch).mean(), _own_loss(model, batch), 1e-12, what=loss.__name__)


def test_multi_label_loss_averages_to_the_heads_own_loss():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=48, num_labels=3,
                           problem_type="multi_label_classification", dropout=0.0, attention_dropout=0.0)
    model = DistilBertForSequenceClassification(cfg).double().eval()
    batch = class_batch()
    batch["labels"] = (torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    assert default_loss(model) is multi_label_loss
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_rel_close(multi_label_loss(logits, batch).mean(), _own_loss(model, batch), 1e-12, what="multi-label")


# ---------------------------------------------------------------- the whole output object


class TwoHeads(nn.Module):
    """Returns per-example scores, per-token features and a scalar statistic over the whole batch."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.score = nn.Linear(8, 2)
        self.feature = nn.Linear(8, 3)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        scores = self.score(h.mean(1))
        return {"scores": scores, "features": self.feature(h), "batch_norm": (scores**2).mean(), "note": 7}


def _two_heads_loss(outputs, batch):
    assert outputs["batch_norm"] is None and outputs["note"] == 7
    return outputs["scores"].pow(2).sum(-1) + outputs["features"].abs().mean((1, 2))


def test_a_dict_output_reaches_the_loss_whole_with_the_batchless_statistic_left_out():
    torch.manual_seed(0)
    model = TwoHeads().double()
    batch = {"input_ids": torch.randint(0, 20, (3, 5))}
    zm = zo_fx.zo_compile(model, batch, loss=_two_heads_loss)
    assert zm.captured.outputs.dropped == ("batch_norm",)
    assert any("left out" in note and "batch_norm" in note for note in zm.report(3).notes)
    table = _table(3)
    # the reference: the eager model perturbed in place, its statistic removed as the graph does
    reference = lambda out, b: _two_heads_loss({**out, "batch_norm": None}, b)  # noqa: E731
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, reference),
                     1e-12, what="dict output")


def test_outputs_all_hands_a_logits_model_its_whole_output():
    model, batch = tiny_funnel(), class_batch()
    seen = []

    def loss(outputs, batch):
        seen.append(type(outputs).__name__)
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    zm = zo_fx.zo_compile(model, batch, loss=loss, outputs="all")
    table = _table(3)
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, loss), 1e-10,
                     what="outputs='all'")
    assert seen[0] == "SequenceClassifierOutput"


def test_an_unknown_outputs_mode_is_refused():
    with pytest.raises(ValueError, match="outputs must be one of"):
        zo_fx.zo_compile(tiny_funnel(), class_batch(), outputs="hidden")


# ---------------------------------------------------------------- the model is left as it was


class WritesOnItself(nn.Module):
    """Keeps the last input's length and a tensor of the last forward on itself, as caching models do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.cache = []

    def forward(self, x):
        self.last_len = x.shape[0]
        self.cache.append(x.sum())
        self.seen = x * 2
        return self.lin(x)


def test_capture_leaves_attributes_training_flag_and_hooks_as_they_were():
    model = WritesOnItself().train()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    state = dict(vars(model))
    zm = zo_fx.zo_compile(model, {"x": torch.randn(3, 4)}, loss=lambda out, b: out.sum(-1))
    assert model.training, "the training flag is put back"
    assert dict(vars(model)).keys() == state.keys() and model.cache == []
    assert len(model._forward_hooks) == 1
    assert any("last_len" in note for note in zm.report().notes)
    model.eval()
    calls.clear()
    model(torch.randn(2, 4))
    assert calls == [1]


# ---------------------------------------------------------------- settling and refusals


class SettlesOnFirstForward(nn.Module):
    """Halves its weight on the first eval forward (as RWKV rescales its layers)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.settled = False

    def forward(self, x):
        if not self.settled:
            with torch.no_grad():
                self.lin.weight.mul_(0.5)
            self.settled = True
        return self.lin(x)


def _sum_loss(out, batch):
    return out.sum(-1)


def test_a_model_that_settles_its_weights_is_refused_with_advice_when_asked_and_left_untouched():
    torch.manual_seed(0)
    model, batch = SettlesOnFirstForward(), {"x": torch.randn(3, 4)}
    weight = model.lin.weight.detach().clone()
    with pytest.raises(zo_fx.ExportFailedError, match="settle") as refused:
        zo_fx.zo_compile(model, batch, loss=_sum_loss, settle=False)
    assert refused.value.cause == "state mutation"
    assert not model.settled
    assert_bitwise_equal(model.lin.weight.detach(), weight, what="weight after a refused capture")


def test_a_model_that_settles_its_weights_is_settled_once_with_a_warning():
    torch.manual_seed(0)
    model, batch = SettlesOnFirstForward(), {"x": torch.randn(3, 4)}
    weight = model.lin.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"ran one eager forward.*lin\.weight"):
        zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    assert_bitwise_equal(model.lin.weight.detach(), weight * 0.5, what="settled once")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = _table(3)
        assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, _sum_loss),
                         1e-5, what="settled model")


class BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_data_dependent_control_flow_is_named_with_what_to_try():
    with pytest.raises(zo_fx.ExportFailedError, match=r"(?s)data-dependent control flow.*What to try") as refused:
        zo_fx.zo_compile(BranchesOnValues(), {"x": torch.randn(3, 4)}, loss=_sum_loss)
    assert refused.value.cause == "data-dependent control flow"


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)

    def forward(self, input_ids, use_cache=None):
        return self.embed(input_ids).mean(1)


class PassesItsOwnUseCache(nn.Module):
    """A Hugging Face-style head whose forward takes **kwargs and sets use_cache itself (T5Gemma's heads)."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.inner = _Inner()
        self.score = nn.Linear(6, 2)

    def forward(self, input_ids, **kwargs):
        return self.score(self.inner(input_ids, use_cache=False, **kwargs))


def test_a_forward_that_sets_use_cache_itself_is_captured_without_ours():
    torch.manual_seed(0)
    model, batch = PassesItsOwnUseCache().double(), {"input_ids": torch.randint(0, 20, (3, 5))}
    zm = zo_fx.zo_compile(model, batch, loss=_sum_loss)
    table = _table(3)
    assert_rel_close(zm.group_losses(batch, table), explicit_group_losses(model, zm, batch, table, _sum_loss),
                     1e-12, what="own use_cache")
