"""The task a job trains on, checked before the model loads so bad data fails in a second, not after 20.

:func:`build_task` turns the task flags of a :class:`FinetuneConfig` into a
:class:`zo_fx.tasks.ClassificationTask` and translates the task layer's errors (which name
keyword arguments) into :class:`FinetuneError` messages that name the command-line flags.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from zo_fx.finetune.config import FinetuneConfig, FinetuneError
from zo_fx.finetune.labels import parse_label_words, spaced_label_words
from zo_fx.tasks import TASKS, get_task


def build_task(cfg: FinetuneConfig):
    """The task of ``cfg``, with every split non-empty and the train split able to fill a batch."""
    template = cfg.template.replace("\\n", "\n").replace("\\t", "\t") if cfg.template is not None else None
    words = parse_label_words(cfg.label_words)
    is_file = cfg.task.endswith(".jsonl") or Path(cfg.task).is_file() or Path(cfg.task).is_dir()
    if is_file:
        if not Path(cfg.task).exists():
            raise FinetuneError(f"--task {cfg.task!r}: no such file; give the path of a jsonl file of "
                                '{"text": ..., "label": ...} lines, or a task name: ' + ", ".join(TASKS))
        if words is None or template is None:
            raise FinetuneError(
                f"--task {cfg.task} is a jsonl file or folder, so it needs --label-words and --template, e.g. "
                "--label-words pos=great,neg=terrible --template '{text} It was'"
            )
    if template is not None and "{" not in template:
        raise FinetuneError(f"--template {template!r} has no slot for the text; write it with {{text}}, e.g. "
                            "'Review: {text} It was'")
    if template is not None and words is not None:
        words = spaced_label_words(words, template)
    try:
        task = get_task(cfg.task, label_words=words, template=template, data_dir=cfg.data_dir, seed=cfg.seed,
                        n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
        if words is not None and template is None:  # built-in template: space the words to fit it
            spaced = spaced_label_words(task.label_words, task.template)
            task = dataclasses.replace(task, label_words=list(spaced))
        for split in ("train", "validation", "test"):
            task.split(split)
        task = task.with_demonstrations(cfg.demonstrations, cfg.seed)
    except (ValueError, TypeError, KeyError, OSError, ImportError, NotImplementedError) as err:
        raise FinetuneError(f"task {cfg.task!r}: {_as_flags(str(err))}") from None
    if len(task.train) < cfg.batch_size:
        raise FinetuneError(f"task {task.name!r} has {len(task.train)} training examples, fewer than "
                            f"--batch-size {cfg.batch_size}; lower --batch-size or give more data")
    return task


def _as_flags(message: str) -> str:
    """The task layer names its keyword arguments (``n_train``); say the command-line flags instead."""
    for name in ("data_dir", "n_train", "n_val", "n_test", "label_words"):
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message
