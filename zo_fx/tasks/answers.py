"""Answer tasks: a prompt (or a context and a question) and the accepted answers.

Trained as MeZO and FZOO train SQuAD and DROP: the loss is the per-example token
cross-entropy of the first gold answer after the prompt (prompt tokens masked); evaluated
by greedy decoding, with exact match and token F1 (SQuAD's normalisation) against every
accepted answer. Sources: a jsonl file (split 80/10/10 by prompt) or folder of
``{"prompt": ..., "answers": [...]}`` or ``{"context": ..., "question": ..., "answers": [...]}``
lines, or the paper tasks of :func:`zo_fx.tasks.load_generation_task` (SQuAD, DROP, ReCoRD).
"""

from __future__ import annotations

from pathlib import Path

from zo_fx.rewards import exact_match, token_f1
from zo_fx.tasks.jsonl import read_jsonl
from zo_fx.tasks.reward_task import SPLITS, RewardTask
from zo_fx.tasks.splits import demonstration_indices, hash_split

#: the prompt of a row with a context and a question (MeZO's SQuAD prompt without the title)
CONTEXT_TEMPLATE = "{context}\nQuestion: {question}\nAnswer:"
ANSWER_KEYS = ("answers", "answer")


def answers_of(row: dict, where: str) -> list[str]:
    value = next((row[k] for k in ANSWER_KEYS if k in row), None)
    if isinstance(value, dict) and "text" in value:  # SQuAD's {"text": [...], "answer_start": [...]}
        value = value["text"]
    answers = [str(a) for a in (value if isinstance(value, (list, tuple)) else [value]) if a not in (None, "")]
    if not answers:
        raise ValueError(f"{where}: needs a non-empty \"answers\" list (or \"answer\")")
    return answers


def example_of(row: dict, where: str) -> dict:
    """``{"prompt", "answers"}`` (plus the row's other fields) of a jsonl row."""
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        prompt = row["prompt"]
    elif isinstance(row.get("question"), str):
        prompt = CONTEXT_TEMPLATE.format(context=row.get("context", ""), question=row["question"])
    else:
        raise ValueError(f"{where}: needs a \"prompt\", or a \"context\" and a \"question\"")
    rest = {k: v for k, v in row.items() if k not in ("prompt", *ANSWER_KEYS)}
    return {**rest, "prompt": prompt, "answers": answers_of(row, where)}


def is_answer_file(path: str | Path) -> bool:
    """Whether a jsonl file (or a folder's train.jsonl) holds answer rows rather than labelled text."""
    path = Path(path)
    file = path / "train.jsonl" if path.is_dir() else path
    try:
        rows = read_jsonl(file)
    except (OSError, ValueError):
        return False
    return bool(rows) and any(k in rows[0] for k in ANSWER_KEYS) and "label" not in rows[0]


def answer_task(name: str, description: str, splits: dict[str, list[dict]]) -> RewardTask:
    """An answer task: exact match is the score, token F1 is reported beside it (weight 0)."""
    return RewardTask(name, description, [exact_match, token_f1], [1.0, 0.0], **splits)


def answers_from_jsonl(path: str | Path) -> RewardTask:
    path = Path(path)
    if path.is_dir():
        splits = {s: [example_of(r, f"{path / s}.jsonl, example {i}")
                      for i, r in enumerate(read_jsonl(path / f"{s}.jsonl"), start=1)] for s in SPLITS}
    else:
        rows = [example_of(r, f"{path}, example {i}") for i, r in enumerate(read_jsonl(path), start=1)]
        splits = dict(zip(SPLITS, hash_split(rows, key=lambda row: row["prompt"])))
    return answer_task(path.stem or path.name, f"answers of {path.name}", splits)


def encode_answers(tokenizer, examples: list[dict], max_length: int) -> dict:
    """Prompt + " " + first answer + EOS per example, right-padded; ``labels`` only on the answer and EOS.

    A prompt too long for ``max_length`` loses its start (the question is at its end); the answer keeps
    at most half of ``max_length``.
    """
    import torch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, labels = [], []
    for e in examples:
        prompt = tokenizer(e["prompt"])["input_ids"]
        answer = (tokenizer(" " + e["answers"][0].strip(), add_special_tokens=False)["input_ids"] + eos)
        answer = answer[: max(1, max_length // 2)]
        if len(prompt) + len(answer) > max_length:
            prompt = prompt[len(prompt) + len(answer) - max_length:]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([t + [-100] * (width - len(t)) for t in labels]),
    }


def answers_from_generation_task(task) -> RewardTask:
    """A :class:`~zo_fx.tasks.generation.GenerationTask` (SQuAD, DROP, ReCoRD) as an answer task."""
    splits = {s: [{"prompt": task.prompt(e), "answers": list(e.answers)} for e in getattr(task, s)] for s in SPLITS}
    return answer_task(task.name, task.description, splits)


def with_answer_demonstrations(task: RewardTask, k: int, seed: int, separator: str = "\n\n") -> RewardTask:
    """``task`` with ``k`` solved training examples (prompt, space, first answer) before every prompt.

    Drawn once by ``seed`` from the train split and shown before every prompt of every split, as
    :meth:`zo_fx.tasks.base.ClassificationTask.with_demonstrations` does for classification.
    """
    if k == 0:
        return task
    train = task.split("train")
    chosen = demonstration_indices(len(train), k, seed, task.name)
    shown = separator.join(train[i]["prompt"] + " " + train[i]["answers"][0].strip() for i in chosen) + separator
    splits = {s: [{**e, "prompt": shown + e["prompt"]} for e in getattr(task, s)] for s in SPLITS}
    return RewardTask(task.name, f"{task.description}, {k} demonstrations", task.rewards, task.weights, **splits)
