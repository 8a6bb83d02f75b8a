"""The loss a job scores examples with: cross-entropy over the label words at the last prompt token
(at the mask token, for a masked LM).

This is MeZO's ``train_as_classification`` (:class:`zo_fx.losses.CandidateClassificationLoss`).
Prompt tuning and P-tuning prepend virtual tokens to the model's outputs, so for them the loss
reads its positions shifted by them (:class:`ShiftedCandidateLoss`).
"""

from __future__ import annotations

import torch

from zo_fx.finetune.config import FinetuneError
from zo_fx.finetune.model import is_masked_lm
from zo_fx.finetune.peft_methods import prompt_offset
from zo_fx.losses import CandidateClassificationLoss, MaskedCandidateLoss


class ShiftedCandidateLoss:
    """The candidate loss for prompt tuning, whose outputs start with ``offset`` virtual tokens.

    Forwards the readout protocol of :class:`zo_fx.CandidateClassificationLoss` (positions
    shifted by the virtual tokens), so the compiled step still reads only the label words.
    """

    def __init__(self, base, offset: int):
        self.base, self.offset = base, int(offset)
        self.label_token_ids = base.label_token_ids
        self.loss_keys = base.loss_keys
        if hasattr(base, "from_readout"):
            self.readout_token_ids = base.readout_token_ids
            self.from_readout = base.from_readout

    def readout_positions(self, batch: dict) -> torch.Tensor:
        return self.base.readout_positions(batch) + self.offset

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.base(logits[:, self.offset:], batch)

    def predict(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.base.predict(logits[:, self.offset:], batch)


def check_label_words(task, tokenizer) -> list[int]:
    """The label words' token ids, or a FinetuneError naming the word that is not one distinct known token."""
    try:
        return task.label_token_ids(tokenizer)
    except ValueError as err:
        raise FinetuneError(str(err)) from None


def fit_task(task, tokenizer, model):
    """``task`` as ``model`` reads it: with a mask token where the label word goes for a masked LM."""
    if not is_masked_lm(model):
        return task
    try:
        return task.for_masked_lm(tokenizer)
    except ValueError as err:
        raise FinetuneError(str(err)) from None


def build_loss(task, tokenizer, model, peft: str | None = None):
    """The candidate loss over ``task``'s label words (read at the mask token of a masked LM), shifted past
    the virtual tokens that prompt tuning and P-tuning put before the outputs.

    The shift is read from ``model``'s adapter config, not from the ``--peft`` name, so a
    ``--peft-config`` with its own ``num_virtual_tokens`` (or an adapter folder being evaluated)
    is read where its outputs really are; ``peft`` is kept for callers that pass it.
    """
    ids = check_label_words(task, tokenizer)
    if task.mask_token_id is not None:
        return MaskedCandidateLoss(ids, task.mask_token_id)
    loss = CandidateClassificationLoss(ids)
    offset = prompt_offset(model)
    return ShiftedCandidateLoss(loss, offset) if offset else loss
