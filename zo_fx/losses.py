"""Per-example losses computed from a model's outputs.

A model's own ``labels`` loss averages over the whole batch, which would mix the G
perturbed groups of a batched evaluation, so zo_fx computes the loss of every example
itself. Every loss here maps ``(outputs, batch) -> Tensor[N]`` (one value per example)
and is what a user-supplied ``loss`` must look like too. Nothing is differentiated,
so a non-differentiable objective (accuracy, F1) is a legal loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n, t, v = logits.shape
    tok = F.cross_entropy(_float(logits).reshape(n * t, v), labels.reshape(n * t), ignore_index=IGNORE_INDEX,
                          reduction="none").view(n, t)
    valid = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return tok.sum(1) / valid.to(tok.dtype)


def causal_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy per example over labels != -100 (labels shifted by one, as HF does)."""
    labels = batch["labels"]
    extra = logits.shape[1] - labels.shape[1]
    if extra > 0:  # virtual tokens prepended by prompt tuning: they have no label, as PEFT pads them
        labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE_INDEX), labels], dim=1)
    return _token_mean(logits[:, :-1], labels[:, 1:])


def masked_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the masked positions (labels != -100), no shift."""
    return _token_mean(logits, batch["labels"])


def seq2seq_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the decoder labels != -100, no shift.

    For encoder-decoder LMs (T5, BART, Marian, ...): ``logits`` are the decoder's,
    ``[N, T_dec, V]``, and ``labels`` are already the next token of every decoder
    position (``decoder_input_ids`` is the target shifted right), as HF's own loss uses them.
    """
    return _token_mean(logits, batch["labels"])


def token_classification_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the labelled tokens (labels != -100), no shift."""
    return _token_mean(logits, batch["labels"])


def sequence_classification_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy per example for a classification head; squared error for a 1-output regression head.

    Also the loss of image and audio classification heads (``[N, num_labels]`` logits too).
    """
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return (_float(logits).squeeze(-1) - labels.to(_float(logits).dtype)) ** 2
    return F.cross_entropy(_float(logits), labels, reduction="none")


def last_token_positions(batch: dict, seq_len: int) -> torch.Tensor:
    """Index of the last real token of each (right-padded) example."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    if mask is None:
        return torch.full((ids.shape[0],), seq_len - 1, dtype=torch.long, device=ids.device)
    return mask.sum(1).long().clamp(min=1) - 1


class CandidateClassificationLoss:
    """Prompt-based classification scored on candidate label words (MeZO's ``train_as_classification``).

    The prompt ends right before the label word; the logits at the last real token are
    restricted to the candidate words' token ids and scored with cross-entropy against
    ``batch[label_key]`` (the index of the gold candidate).
    """

    def __init__(self, label_token_ids: Sequence[int], label_key: str = "class_labels"):
        if len(label_token_ids) < 2:
            raise ValueError(f"need at least two candidate label tokens; got {list(label_token_ids)}")
        self.label_token_ids = [int(t) for t in label_token_ids]
        self.label_key = label_key

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """Batch keys this loss reads and the model does not take."""
        return (self.label_key,)

    # Readout protocol (see zo_fx.passes.readout): the loss reads one position per example and
    # only the label words' rows of the output head, so the runtime computes just those logits.
    @property
    def readout_token_ids(self) -> list[int]:
        return self.label_token_ids

    def readout_positions(self, batch: dict) -> torch.Tensor:
        return last_token_positions(batch, batch["input_ids"].shape[1])

    def from_readout(self, candidate_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(_float(candidate_logits), batch[self.label_key], reduction="none")

    def candidate_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        pos = last_token_positions(batch, logits.shape[1])
        last = logits[torch.arange(logits.shape[0], device=logits.device), pos]
        return _float(last[:, self.label_token_ids])

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.candidate_logits(logits, batch), batch[self.label_key], reduction="none")

    def predict(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.candidate_logits(logits, batch).argmax(-1)


class MaskedCandidateLoss(CandidateClassificationLoss):
    """Prompt-based classification for a masked LM: the label words scored at the mask token.

    FZOO's and MeZO's RoBERTa setting (LM-BFF's prompts): the prompt holds one mask token where
    the label word goes; the logits at that position, restricted to the candidate words, are
    scored with cross-entropy against ``batch[label_key]``.
    """

    def __init__(self, label_token_ids: Sequence[int], mask_token_id: int, label_key: str = "class_labels"):
        super().__init__(label_token_ids, label_key)
        self.mask_token_id = int(mask_token_id)

    def readout_positions(self, batch: dict) -> torch.Tensor:
        is_mask = batch["input_ids"] == self.mask_token_id
        counts = is_mask.sum(1)
        if bool((counts != 1).any()):
            row = int((counts != 1).nonzero()[0])
            raise ValueError(f"example {row} of the batch has {int(counts[row])} mask tokens (id "
                             f"{self.mask_token_id}); prompt-based classification reads exactly one")
        return is_mask.int().argmax(1)

    def candidate_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        pos = self.readout_positions(batch)
        at_mask = logits[torch.arange(logits.shape[0], device=logits.device), pos]
        return _float(at_mask[:, self.label_token_ids])


# Encoder-decoder LM heads whose class name does not end in "ForConditionalGeneration". All of them
# (like every *ForConditionalGeneration with config.is_encoder_decoder) score the decoder logits
# against unshifted labels; the bare encoder-decoders (T5Model, BartModel) have no LM head and are not here.
_SEQ2SEQ_LM_SUFFIXES = ("ForConditionalGeneration", "ForTextToText", "ForSpeechToText")
_SEQ2SEQ_LM_NAMES = frozenset({"MarianMTModel", "EncoderDecoderModel", "SpeechEncoderDecoderModel",
                               "VisionEncoderDecoderModel"})


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _is_seq2seq_lm_name(name: str) -> bool:
    return name.endswith(_SEQ2SEQ_LM_SUFFIXES) or name in _SEQ2SEQ_LM_NAMES


_BUILT_IN = ("causal LM (*ForCausalLM, *LMHeadModel), masked LM (*ForMaskedLM), "
             "encoder-decoder LM (*ForConditionalGeneration, *ForTextToText, *ForSpeechToText, MarianMTModel, "
             "[Speech|Vision]EncoderDecoderModel, with config.is_encoder_decoder), "
             "sequence/image/audio classification (*ForSequenceClassification, *ForImageClassification, "
             "*ForAudioClassification), token classification (*ForTokenClassification), "
             "CandidateClassificationLoss")


def default_loss(model: torch.nn.Module) -> LossFn:
    """The built-in loss for a model, from its (base) class name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return causal_lm_loss
    if name.endswith("ForMaskedLM"):
        return masked_lm_loss
    if _is_seq2seq_lm_name(name) and _is_encoder_decoder(base):
        return seq2seq_lm_loss
    if name.endswith(("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")):
        return sequence_classification_loss
    if name.endswith("ForTokenClassification"):
        return token_classification_loss
    why = " (its config is not encoder-decoder)" if _is_seq2seq_lm_name(name) else ""
    raise ValueError(
        f"zo_fx has no built-in loss for {name}{why}; pass loss=callable(outputs, batch) -> per-example tensor "
        f"(built in: {_BUILT_IN})"
    )
