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


def logits_field(outputs) -> torch.Tensor | None:
    """The ``logits`` of a Hugging Face output object (or a dict), else None."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def logits_of(outputs) -> torch.Tensor:
    """The logits in what a loss received: the tensor itself, or the ``logits`` field of a whole output
    object (a model compiled with ``outputs="all"``), or a tuple's first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = logits_field(outputs)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"this loss reads logits; the model's output {type(outputs).__name__} has none")
    return logits


def _field(outputs, name: str, position: int) -> torch.Tensor:
    """``outputs.name`` of an output object, ``outputs[name]`` of a dict, or ``outputs[position]`` of a tuple."""
    if isinstance(outputs, dict):
        value = outputs.get(name)
    elif isinstance(outputs, (tuple, list)):
        value = outputs[position] if len(outputs) > position else None
    else:
        value = getattr(outputs, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"this loss reads {name!r} (or element {position} of a tuple) from the model's output; "
                        f"{type(outputs).__name__} has no such tensor")
    return value


def _token_mean(logits: torch.Tensor, labels: torch.Tensor, positions: int | None = None) -> torch.Tensor:
    """Mean cross-entropy per example over labels != -100, of the first ``positions`` positions (default all).

    The cross-entropy runs on all of ``logits`` (contiguous as the head wrote them): a sliced view of
    a vocabulary-wide tensor would be copied whole by the reshape, and its rows' losses are the same.
    """
    n, t, v = logits.shape
    tok = F.cross_entropy(_float(logits).reshape(n * t, v), labels.reshape(n * t), ignore_index=IGNORE_INDEX,
                          reduction="none").view(n, t)
    if positions is not None:
        # contiguous, as the sliced logits' losses were: the per-row sum then runs in the same order on any device
        tok, labels = tok[:, :positions].contiguous(), labels[:, :positions]
    valid = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return tok.sum(1) / valid.to(tok.dtype)


def causal_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy per example over labels != -100 (labels shifted by one, as HF does)."""
    logits = logits_of(logits)
    labels = batch["labels"]
    extra = logits.shape[1] - labels.shape[1]
    if extra > 0:  # virtual tokens prepended by prompt tuning: they have no label, as PEFT pads them
        labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE_INDEX), labels], dim=1)
    # position t predicts token t + 1; the last position predicts nothing (its target is ignored)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return _token_mean(logits, targets, positions=logits.shape[1] - 1)


def masked_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the masked positions (labels != -100), no shift."""
    logits = logits_of(logits)
    return _token_mean(logits, batch["labels"])


def seq2seq_lm_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the decoder labels != -100, no shift.

    For encoder-decoder LMs (T5, BART, Marian, ...): ``logits`` are the decoder's,
    ``[N, T_dec, V]``, and ``labels`` are already the next token of every decoder
    position (``decoder_input_ids`` is the target shifted right), as HF's own loss uses them.
    """
    logits = logits_of(logits)
    return _token_mean(logits, batch["labels"])


def token_classification_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per example over the labelled tokens (labels != -100), no shift."""
    logits = logits_of(logits)
    return _token_mean(logits, batch["labels"])


def sequence_classification_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy per example for a classification head; squared error for a 1-output regression head.

    Also the loss of image and audio classification heads (``[N, num_labels]`` logits too).
    """
    logits = logits_of(logits)
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return (_float(logits).squeeze(-1) - labels.to(_float(logits).dtype)) ** 2
    if labels.dtype.is_floating_point and labels.shape == logits.shape:
        raise ValueError(
            "float labels of the logits' shape: a multi-target regression or multi-label head. Use "
            "regression_loss or multi_label_loss (default_loss picks them from config.problem_type)"
        )
    return F.cross_entropy(_float(logits), labels, reduction="none")


def regression_loss(logits, batch: dict) -> torch.Tensor:
    """Mean squared error per example over the head's outputs (``problem_type="regression"``)."""
    logits = _float(logits_of(logits))
    labels = batch["labels"].to(logits.dtype).reshape(logits.shape)
    return ((logits - labels) ** 2).reshape(logits.shape[0], -1).mean(1)


def multi_label_loss(logits, batch: dict) -> torch.Tensor:
    """Binary cross-entropy per example averaged over labels (``problem_type="multi_label_classification"``)."""
    logits = _float(logits_of(logits))
    labels = batch["labels"].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").reshape(logits.shape[0], -1).mean(1)


def multiple_choice_loss(logits, batch: dict) -> torch.Tensor:
    """Cross-entropy per example over the choices: logits ``[N, choices]``, labels the gold choice."""
    logits = _float(logits_of(logits))
    return F.cross_entropy(logits, batch["labels"], reduction="none")


class SpanQALoss:
    """Extractive QA: mean of the start and end cross-entropies per example, as the QA heads score a span.

    Reads ``start_logits`` / ``end_logits`` (fields of the output object, or elements 0 and 1
    of a tuple) and ``start_positions`` / ``end_positions`` from the batch. Positions
    outside the sequence are clamped to its length and ignored, as the heads' own loss does
    (an answer truncated away contributes nothing).
    """

    outputs = "all"
    loss_keys = ("start_positions", "end_positions")

    def __call__(self, outputs, batch: dict) -> torch.Tensor:
        start, end = _field(outputs, "start_logits", 0), _field(outputs, "end_logits", 1)
        length = start.shape[1]
        total = 0
        for logits, key in ((start, "start_positions"), (end, "end_positions")):
            positions = batch[key].reshape(-1).clamp(0, length)
            total = total + F.cross_entropy(_float(logits), positions, ignore_index=length, reduction="none")
        return total / 2

    def predict(self, outputs, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The best start and end position of each example (argmax of each, no length constraint)."""
        return _field(outputs, "start_logits", 0).argmax(-1), _field(outputs, "end_logits", 1).argmax(-1)


span_qa_loss = SpanQALoss()


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
             "*ForAudioClassification; regression and multi-label by config.problem_type), token classification "
             "(*ForTokenClassification), multiple choice (*ForMultipleChoice), span QA (*ForQuestionAnswering), "
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
        problem = getattr(getattr(base, "config", None), "problem_type", None)
        if problem == "regression":
            return regression_loss
        if problem == "multi_label_classification":
            return multi_label_loss
        return sequence_classification_loss
    if name.endswith("ForMultipleChoice"):
        return multiple_choice_loss
    if name.endswith("ForQuestionAnswering"):
        return span_qa_loss
    if name.endswith("ForTokenClassification"):
        return token_classification_loss
    why = " (its config is not encoder-decoder)" if _is_seq2seq_lm_name(name) else ""
    raise ValueError(
        f"zo_fx has no built-in loss for {name}{why}; pass loss=callable(outputs, batch) -> per-example tensor "
        f"(built in: {_BUILT_IN})"
    )
