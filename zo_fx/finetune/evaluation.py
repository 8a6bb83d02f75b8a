"""Accuracy and loss of the current weights on a split: the numbers a job reports before, during and after.

One function, shared by the job (zero-shot, on the validation schedule, final) and the
convergence benchmark, so every reported accuracy is measured the same way.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from zo_fx.passes.capture import model_output_tensor

EVAL_BATCH_SIZE = 64


@torch.no_grad()
def evaluate(model, task, tokenizer, loss, split: str, max_length: int, desc: str = "") -> dict:
    """Accuracy and mean loss of ``model`` on ``split``, in batches, with a progress bar."""
    examples = task.split(split)
    total, correct = 0.0, 0
    for lo in tqdm(range(0, len(examples), EVAL_BATCH_SIZE), desc=desc or f"eval {split}", unit="batch",
                   leave=False, dynamic_ncols=True):
        batch = task.encode(tokenizer, examples[lo:lo + EVAL_BATCH_SIZE], max_length)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = model_output_tensor(outputs)
        total += float(loss(logits, batch).double().sum())
        correct += int((loss.predict(logits, batch) == batch["class_labels"]).sum())
    n = len(examples)
    return {"split": split, "accuracy": correct / n, "loss": total / n, "n": n}
