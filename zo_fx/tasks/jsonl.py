"""Reading jsonl files, and a classification task from the user's own jsonl file.

A user file holds one JSON object per line with ``"text"`` and ``"label"``; the label may be
a string (``"spam"``) or an int. It is split and scored exactly like the built-in tasks:
80/10/10 by a hash of the text (``splits.hash_split``), one label word per class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zo_fx.tasks.base import ClassificationTask, Example, template_slots
from zo_fx.tasks.splits import hash_split, subsample


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a file, one per non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such jsonl file: {path}")
    rows = []
    with path.open(encoding="utf-8-sig") as handle:  # a byte-order mark is valid input
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _label_index(label_words: Mapping[Any, str] | Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(words in class order, label value as a string -> class index).

    Keys are compared as strings so that ``{"1": " yes"}`` (JSON from a command line) and
    ``{1: " yes"}`` both match a label written as ``1`` or ``"1"`` in the file.
    """
    if isinstance(label_words, Mapping):
        items = list(label_words.items())
    elif isinstance(label_words, Sequence) and not isinstance(label_words, str):
        items = list(enumerate(label_words))
    else:
        raise TypeError(f"label_words must be a dict {{label: word}} or a list of words, got {label_words!r}")
    if len(items) < 2:
        raise ValueError(
            f"a classification task needs at least 2 classes; label_words has {len(items)}: {label_words!r}"
        )
    return [word for _, word in items], {str(value): i for i, (value, _) in enumerate(items)}


def load_jsonl_task(
    path: str | Path,
    label_words: Mapping[Any, str] | Sequence[str],
    template: str,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
) -> ClassificationTask:
    """A classification task from a jsonl file of ``{"text": ..., "label": ...}`` lines.

    Args:
        path: the jsonl file.
        label_words: the word for each label value, ``{"spam": " spam", "ham": " ham"}``; a list
            means the labels are the ints 0..n-1. Dict order is class order.
        template: must contain ``{text}`` and end right before the label word, e.g.
            ``"Message: {text}\\nSpam or ham?"``.
        seed, n_train, n_val, n_test: seeded subsampling of each split (None keeps all).

    Example::

        task = load_jsonl_task("reviews.jsonl", {"neg": " bad", "pos": " good"}, "{text} It was")
    """
    path = Path(path)
    _check_template(template)
    words, index = _label_index(label_words)
    examples = _read_examples(path, index)
    _check_classes(path, examples)
    splits = hash_split(examples, key=lambda e: e.fields["text"])
    return _task(path.stem, template, words, splits, (n_train, n_val, n_test), seed,
                 f"{path}, split 80/10/10 by blake2b(text)")


SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")


def _check_template(template: str) -> None:
    if "text" not in template_slots(template):
        raise ValueError(
            f"template {template!r} must contain {{text}}, where each line's text goes, "
            "e.g. '{text} It was'"
        )


def _task(name: str, template: str, words: list[str], splits, sizes, seed: int, description: str):
    """The task of ``splits`` (train, validation, test), each subsampled to its size (None keeps all)."""
    train, validation, test = (subsample(split, n, seed) for split, n in zip(splits, sizes))
    return ClassificationTask(name=name, template=template, label_words=words, train=train,
                              validation=validation, test=test, description=description)


def _read_examples(path: Path, index: dict) -> list[Example]:
    examples = []
    for number, row in enumerate(read_jsonl(path), start=1):
        for key in ("text", "label"):
            if key not in row:
                raise ValueError(
                    f"{path}, line {number}: missing {key!r}; each line needs 'text' and 'label'"
                )
        if str(row["label"]) not in index:
            raise ValueError(
                f"{path}, line {number}: label {row['label']!r} has no label word; label_words "
                f"covers {list(index)}"
            )
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{path}, line {number}: 'text' must be a non-empty string; got {text!r}. Fix or remove the line."
            )
        examples.append(Example({"text": text}, index[str(row["label"])]))
    return examples


def _check_classes(path: Path, examples: list[Example]) -> None:
    seen = {e.label for e in examples}
    if len(seen) < 2:
        raise ValueError(
            f"{path} has {len(examples)} examples but {len(seen)} class(es); a classification "
            "task needs examples of at least 2 classes"
        )


def load_jsonl_folder(
    folder: str | Path,
    label_words: Mapping[Any, str] | Sequence[str],
    template: str,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
) -> ClassificationTask:
    """A task whose user brings the splits: ``folder`` holds train.jsonl, validation.jsonl and test.jsonl.

    Same line format and arguments as :func:`load_jsonl_task`; nothing is re-split, so a test set
    stays the test set it was meant to be.
    """
    folder = Path(folder)
    missing = [name for name in SPLIT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"task folder {folder} lacks {missing}; it must hold {list(SPLIT_FILES)}")
    _check_template(template)
    words, index = _label_index(label_words)
    splits = [_read_examples(folder / name, index) for name in SPLIT_FILES]
    _check_classes(folder / "train.jsonl", splits[0])
    return _task(folder.name, template, words, splits, (n_train, n_val, n_test), seed,
                 f"{folder}: the user's train / validation / test files")
