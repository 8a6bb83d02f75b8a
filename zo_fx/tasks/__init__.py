"""Tasks for real fine-tuning runs: data, splits, prompt templates and label words.

``get_task`` is the one entry point: the offline default ``"vader"``, a task of the MeZO /
FZOO / AdaMeZO papers by name, or the path of the user's own jsonl file. Every task it
returns is a ``ClassificationTask``, scored as MeZO's ``train_as_classification``: the
cross-entropy over the label words' logits at the position that predicts the label word.

Example::

    task = get_task("vader", n_train=1000)
    batch = task.encode(tokenizer, task.train[:16], max_length=32)
    candidates = task.label_token_ids(tokenizer)   # [id(" negative"), id(" positive")]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zo_fx.tasks.base import SPLITS, ClassificationTask, Example
from zo_fx.tasks.batching import BatchCursor, DataPosition, epoch_order, iter_batches
from zo_fx.tasks.generation import GenerationExample, GenerationTask, GenerationTaskError
from zo_fx.tasks.jsonl import load_jsonl_folder, load_jsonl_task
from zo_fx.tasks.superglue import (
    canonical_name,
    classification_task_names,
    generation_task_names,
    load_generation_task,
    load_paper_task,
)
from zo_fx.tasks.vader import load_vader_task

__all__ = [
    "SPLITS",
    "TASKS",
    "BatchCursor",
    "ClassificationTask",
    "DataPosition",
    "Example",
    "GenerationExample",
    "GenerationTask",
    "GenerationTaskError",
    "epoch_order",
    "get_task",
    "iter_batches",
    "load_generation_task",
    "load_jsonl_folder",
    "load_jsonl_task",
    "load_paper_task",
    "load_vader_task",
]

DEFAULT_TASK = "vader"

# Every task name get_task knows, with what it is. A path to a .jsonl file is accepted too.
TASKS: dict[str, str] = {
    "vader": "word sentiment from the VADER lexicon (offline, the default)",
    **{name: "classification (MeZO prompt)" for name in classification_task_names()},
    **{
        name: "generation (loadable with load_generation_task, not trainable)"
        for name in generation_task_names()
    },
}


def get_task(
    name_or_path: str | Path = DEFAULT_TASK,
    *,
    label_words: Sequence[str] | Mapping[Any, str] | None = None,
    template: str | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
) -> ClassificationTask:
    """The classification task named ``name_or_path``.

    Args:
        name_or_path: ``"vader"``; a paper task (``"SST-2"``, ``"rte"``, ... any case, see ``TASKS``);
            or a ``.jsonl`` file of ``{"text", "label"}`` lines (split 80/10/10), or a folder of
            ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (the user's own splits).
        label_words: one word per class. For a jsonl file, required: a dict {label value: word} or
            a list indexed by int labels. For a built-in task, an optional list in class order.
        template: the prompt, ending right before the label word. Required for a jsonl file
            (with a ``{text}`` slot); replaces the default of a built-in task.
        data_dir: for a paper task, a folder with train.jsonl and validation.jsonl (and optionally
            test.jsonl) to use instead of Hugging Face ``datasets``.
        seed, n_train, n_val, n_test: seeded subsampling. None keeps every example for "vader"
            and a jsonl file, and means MeZO's 1000/500/1000 for a paper task.
    """
    name = str(name_or_path)
    if Path(name).is_dir():
        if label_words is None or template is None:
            raise ValueError(f"a task folder needs label_words and template (got label_words={label_words!r}, "
                             f"template={template!r})")
        return load_jsonl_folder(name, label_words, template, seed=seed, n_train=n_train, n_val=n_val,
                                 n_test=n_test)
    if name.endswith(".jsonl") or Path(name).is_file():
        if label_words is None or template is None:
            raise ValueError(
                f"a jsonl task needs label_words and template, e.g. label_words={{'neg': ' bad', "
                f"'pos': ' good'}}, template='{{text}} It was' (got label_words={label_words!r}, "
                f"template={template!r})"
            )
        return load_jsonl_task(
            name, label_words, template, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test
        )
    if isinstance(label_words, Mapping):
        raise TypeError(
            f"for the built-in task {name!r} give label_words as a list in class order, got {label_words!r}"
        )
    if name.lower() == "vader":
        return load_vader_task(
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            label_words=None if label_words is None else list(label_words),
            **({} if template is None else {"template": template}),
        )
    if canonical_name(name) is not None:
        sizes = {
            key: value
            for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))
            if value is not None
        }
        return load_paper_task(
            name, data_dir=data_dir, seed=seed, label_words=label_words, template=template, **sizes
        )
    raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}, or give the path of a .jsonl file")
