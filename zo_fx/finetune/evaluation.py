"""Accuracy and loss of the current weights on a split: the numbers a job reports before, during and after.

One function, shared by the job (zero-shot, on the validation schedule, final) and the
convergence benchmark, so every reported accuracy is measured the same way.

An accuracy is never computed from non-finite outputs: the argmax of NaN logits is class 0,
so a broken model would "score" the share of class 0. An example whose loss is not finite is
counted; when any is, accuracy and loss are reported as None (not available) with that count,
and :func:`unavailable` lets callers say so.
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
    total, correct, non_finite = 0.0, 0, 0
    for lo in tqdm(range(0, len(examples), EVAL_BATCH_SIZE), desc=desc or f"eval {split}", unit="batch",
                   leave=False, dynamic_ncols=True):
        batch = task.encode(tokenizer, examples[lo:lo + EVAL_BATCH_SIZE], max_length)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = model_output_tensor(outputs)
        per_example = loss(logits, batch).double()
        finite = torch.isfinite(per_example)
        non_finite += int((~finite).sum())
        total += float(per_example[finite].sum())
        correct += int(((loss.predict(logits, batch) == batch["class_labels"]) & finite).sum())
    n = len(examples)
    if non_finite:
        return {"split": split, "accuracy": None, "loss": None, "n": n, "non_finite": non_finite}
    return {"split": split, "accuracy": correct / n, "loss": total / n, "n": n, "non_finite": 0}


def unavailable(result: dict) -> str | None:
    """Why ``result`` has no accuracy or reward (its non-finite examples), or None when it has one."""
    metric = next((k for k in ("reward", "exact_match") if k in result), "accuracy")
    if result.get(metric) is not None:
        return None
    return (f"{result['split']} {metric} not available: the model's outputs are non-finite (NaN or inf) on "
            f"{result['non_finite']} of {result['n']} examples")


def describe(result: dict) -> str:
    """``accuracy 0.9100, loss 0.2345``, or the reason there is none."""
    reason = unavailable(result)
    if reason:
        return reason
    if "exact_match" in result:
        return f"exact match {result['exact_match']:.4f}, F1 {result['f1']:.4f}"
    if "reward" in result:
        failed = f" ({result['failed']} unscored)" if result.get("failed") else ""
        return f"mean reward {result['reward']:.4f}{failed}"
    return f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}"
