"""The built-in per-example losses against hand-written float64 references, and default_loss's choice.

The references loop over examples and positions with an explicit log-sum-exp in float64,
so they share no code with zo_fx.losses (which goes through F.cross_entropy). The
default_loss checks build tiny transformers models from configs (no downloads) and also
check that the per-example losses recombine to the model's own batch-mean ``labels`` loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from zo_fx.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    default_loss,
    masked_lm_loss,
    seq2seq_lm_loss,
    sequence_classification_loss,
    token_classification_loss,
)

N, T, V, C = 4, 6, 11, 5
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# ---- references ----------------------------------------------------------------------------------------


def _nll(row: torch.Tensor, label: int) -> float:
    """-log softmax(row)[label] in float64, by hand."""
    row = row.double()
    m = row.max().item()
    lse = m + math.log(sum(math.exp(x - m) for x in row.tolist()))
    return lse - row[label].item()


def ref_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: mean of -log p(labels[i, t] | logits[i, t]) over t with labels[i, t] != -100; 0 if none."""
    out = []
    for i in range(labels.shape[0]):
        terms = [_nll(logits[i, t], int(labels[i, t])) for t in range(labels.shape[1])
                 if int(labels[i, t]) != IGNORE_INDEX]
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def ref_causal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1]."""
    return ref_token_mean(logits[:, :-1], labels[:, 1:])


def ref_classification(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return torch.tensor([(logits[i, 0].item() - float(labels[i])) ** 2 for i in range(labels.shape[0])],
                            dtype=torch.float64)
    return torch.tensor([_nll(logits[i], int(labels[i])) for i in range(labels.shape[0])], dtype=torch.float64)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


# ---- random inputs -------------------------------------------------------------------------------------


def token_labels(g: torch.Generator, n: int = N, t: int = T, v: int = V) -> torch.Tensor:
    """Random labels with ragged -100 masking: example 0 fully labelled, 1 partly, 2 with one label, 3 none."""
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[1, torch.tensor([0, 2, 3])] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX  # all ignored: loss 0, not 0/0
    return labels


def token_logits(g: torch.Generator, dtype: torch.dtype, n: int = N, t: int = T, v: int = V) -> torch.Tensor:
    return (3 * torch.randn(n, t, v, generator=g, dtype=torch.float64)).to(dtype)


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


# ---- the losses ----------------------------------------------------------------------------------------


@DTYPES
def test_seq2seq_lm_loss_is_the_unshifted_token_mean(dtype):
    g = torch.Generator().manual_seed(0)
    logits, labels = token_logits(g, dtype), token_labels(g)
    got = seq2seq_lm_loss(logits, {"labels": labels})
    _close(got, ref_token_mean(logits, labels), dtype)
    assert got[3].item() == 0.0
    assert got.dtype == dtype
    # labels are the decoder's next tokens already: not the causal (shifted) loss
    assert not torch.allclose(got.double()[:3], ref_causal(logits, labels)[:3])


@DTYPES
def test_token_classification_loss(dtype):
    g = torch.Generator().manual_seed(1)
    logits, labels = token_logits(g, dtype, v=C), token_labels(g, v=C)
    got = token_classification_loss(logits, {"labels": labels})
    _close(got, ref_token_mean(logits, labels), dtype)
    assert got[3].item() == 0.0


@DTYPES
def test_masked_lm_loss(dtype):
    g = torch.Generator().manual_seed(2)
    logits, labels = token_logits(g, dtype), token_labels(g)
    _close(masked_lm_loss(logits, {"labels": labels}), ref_token_mean(logits, labels), dtype)


@DTYPES
def test_causal_lm_loss_shifts_by_one(dtype):
    g = torch.Generator().manual_seed(3)
    logits, labels = token_logits(g, dtype), token_labels(g)
    got = causal_lm_loss(logits, {"labels": labels})
    _close(got, ref_causal(logits, labels), dtype)
    assert got[3].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_causal_lm_loss_on_whole_logits_equals_the_sliced_formula_bit_for_bit(dtype):
    """The loss reads the head's logits whole (the last position's target ignored) instead of a sliced
    copy: every value must equal the cross-entropy of the slice, mean over its labels, to the bit."""
    g = torch.Generator().manual_seed(5)
    for n, t, v in [(1, 2, 3), (4, 7, 50), (9, 33, 257), (3, 64, 1000)]:
        logits = (3 * torch.randn(n, t, v, generator=g)).to(dtype)
        labels = torch.randint(0, v, (n, t), generator=g)
        labels[torch.rand(n, t, generator=g) < 0.3] = IGNORE_INDEX
        sliced, targets = logits[:, :-1].float() if dtype != torch.float64 else logits[:, :-1], labels[:, 1:]
        tok = torch.nn.functional.cross_entropy(sliced.reshape(-1, v), targets.reshape(-1), reduction="none",
                                                ignore_index=IGNORE_INDEX).view(n, t - 1)
        want = tok.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1).to(tok.dtype)
        assert torch.equal(causal_lm_loss(logits, {"labels": labels}), want), (n, t, v)


def test_causal_lm_loss_skips_virtual_tokens():
    """Prompt tuning prepends k virtual tokens to the logits only: they get no label."""
    g = torch.Generator().manual_seed(4)
    k = 3
    logits, labels = token_logits(g, torch.float64, t=T + k), token_labels(g)
    padded = torch.cat([torch.full((N, k), IGNORE_INDEX), labels], dim=1)
    _close(causal_lm_loss(logits, {"labels": labels}), ref_causal(logits, padded), torch.float64)


def test_half_precision_logits_are_scored_in_float32():
    g = torch.Generator().manual_seed(5)
    logits, labels = token_logits(g, torch.float64), token_labels(g)
    got = seq2seq_lm_loss(logits.bfloat16(), {"labels": labels})
    assert got.dtype == torch.float32
    _close(got, ref_token_mean(logits.bfloat16(), labels), torch.float32)


@DTYPES
def test_sequence_classification_loss(dtype):
    g = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, C, (N,), generator=g)
    _close(sequence_classification_loss(logits, {"labels": labels}), ref_classification(logits, labels), dtype)


@DTYPES
def test_sequence_regression_loss(dtype):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, 1, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randn(N, generator=g, dtype=torch.float64).to(dtype)
    _close(sequence_classification_loss(logits, {"labels": labels}), ref_classification(logits, labels), dtype)


# ---- default_loss on real (tiny) models ----------------------------------------------------------------


def _tiny_t5():
    from zoo_more import tiny_t5

    return tiny_t5()


def _tiny_bart():
    from zoo_more import tiny_bart

    return tiny_bart()


def _tiny_marian():
    from model_zoo import VOCAB
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                       pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    return MarianMTModel(cfg).double().eval()


def _tiny_bert_to_bert():
    """The composite EncoderDecoderModel (its class name does not end in ForConditionalGeneration)."""
    from model_zoo import VOCAB
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(**kw), BertConfig(**kw))
    cfg.decoder_start_token_id, cfg.pad_token_id = 0, 0
    return EncoderDecoderModel(cfg).double().eval()


def _tiny_vit():
    from zoo_more import tiny_vit

    return tiny_vit()


def _tiny_bert_tokens():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=C)
    return BertForTokenClassification(cfg).double().eval()


def _tiny_ast():
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, patch_size=8, frequency_stride=8,
                    time_stride=8, max_length=16, num_mel_bins=16, num_labels=C)
    return ASTForAudioClassification(cfg).double().eval()


def _seq2seq_batch(decoder_start: int):
    """Example 0 right-padded, its last two labels -100 (see zoo_more.seq2seq_batch)."""
    from zoo_more import seq2seq_batch

    return seq2seq_batch(batch_size=3, seed=0, decoder_start=decoder_start)


def _token_batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (3, 7), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(1, 32, (3, 7), generator=g), "attention_mask": mask, "labels": labels}


def _image_batch():
    from zoo_more import image_batch

    return image_batch(batch_size=3)


def _audio_batch():
    g = torch.Generator().manual_seed(0)
    return {"input_values": torch.randn(3, 16, 16, generator=g, dtype=torch.float64), "labels": torch.arange(3) % C}


# name -> (make_model, make_batch, expected loss)
MODELS = {
    "t5": (_tiny_t5, lambda: _seq2seq_batch(0), seq2seq_lm_loss),
    "bart": (_tiny_bart, lambda: _seq2seq_batch(2), seq2seq_lm_loss),
    "marian": (_tiny_marian, lambda: _seq2seq_batch(0), seq2seq_lm_loss),
    "bert2bert": (_tiny_bert_to_bert, lambda: _seq2seq_batch(0), seq2seq_lm_loss),
    "vit": (_tiny_vit, _image_batch, sequence_classification_loss),
    "bert_tokens": (_tiny_bert_tokens, _token_batch, token_classification_loss),
    "ast_audio": (_tiny_ast, _audio_batch, sequence_classification_loss),
}


def _labelled_count(batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    if labels.dim() == 1:
        return torch.ones(labels.shape[0], dtype=torch.float64)
    return (labels != IGNORE_INDEX).sum(1).double()


@pytest.mark.filterwarnings("ignore:Version v4.12.0 introduces:FutureWarning")  # bert2bert given decoder ids
@pytest.mark.parametrize("name", list(MODELS))
def test_default_loss_picks_and_matches_the_models_own_loss(name):
    """default_loss picks the right function, and its per-example losses, weighted by each example's
    labelled-token count, recombine to the model's own (batch-mean) loss on the same batch."""
    make_model, make_batch, expected = MODELS[name]
    model, batch = make_model(), make_batch()
    loss_fn = default_loss(model)
    assert loss_fn is expected, (type(model).__name__, loss_fn)
    with torch.no_grad():
        out = model(**batch)
    per_example = loss_fn(out.logits, batch)
    assert per_example.shape == (batch["labels"].shape[0],)
    w = _labelled_count(batch)
    torch.testing.assert_close((per_example.double() * w).sum() / w.sum(), out.loss.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_default_loss_looks_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_t5(), LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    assert default_loss(model) is seq2seq_lm_loss


class FakeForConditionalGeneration(torch.nn.Module):
    """A decoder-only ForConditionalGeneration (as vision-language models are): not a seq2seq LM."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"is_encoder_decoder": False})()


def test_default_loss_refuses_a_decoder_only_conditional_generation():
    with pytest.raises(ValueError, match="FakeForConditionalGeneration.*not encoder-decoder"):
        default_loss(FakeForConditionalGeneration())


def test_default_loss_names_an_unknown_class():
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="no built-in loss for T5EncoderModel") as err:
        default_loss(model)
    assert "ForConditionalGeneration" in str(err.value)  # the message lists what is built in
    with pytest.raises(ValueError, match="no built-in loss for Linear"):
        default_loss(torch.nn.Linear(2, 2))
