"""The tasks of the MeZO / FZOO / AdaMeZO papers, with MeZO's prompts and sampling.

Data comes from local jsonl files when ``data_dir`` is given (a folder with ``train.jsonl``,
``validation.jsonl`` and optionally ``test.jsonl``, each line a row with the Hugging Face
dataset's field names), and otherwise from Hugging Face ``datasets``, imported only then.

Prompts follow MeZO's ``large_models/templates.py`` (Malladi et al. 2023). Where MeZO's prompt
ends in a newline, its label word follows with no space (``"...Yes or No?\\n" + "Yes"``), and
so does ours. Differences, on purpose:

* COPA: MeZO's main COPA setup scores each choice as a multi-token continuation, which a
  one-position classification loss cannot express. zo_fx uses MeZO's ``CopaCLSTemplate``
  instead (both choices in the prompt, pick one), with the choices named A and B rather
  than 1 and 2: SmolLM2's tokenizer splits ``" 1"`` into a space and a digit, so a digit
  cannot be a one-token label word.
* ReCoRD: MeZO scores each candidate entity; here it is loaded as a generation task with
  MeZO's "Answer:" prompt, like SQuAD and DROP.

Sampling (``splits.mezo_sample``): 1,000 train and 500 validation examples drawn from the
train split, 1,000 test examples drawn from the validation split, all with the seed and
capped by the available size. When a local ``test.jsonl`` exists, each file feeds its own
split instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo_fx.tasks.base import ClassificationTask, Example
from zo_fx.tasks.generation import GenerationExample, GenerationTask, GenerationTaskError
from zo_fx.tasks.jsonl import read_jsonl
from zo_fx.tasks.splits import mezo_sample, subsample

Row = Mapping[str, Any]


@dataclass(frozen=True)
class PaperTask:
    """How to turn one dataset row into template fields, and the prompt that uses them.

    ``label_words`` is None for a generation task, whose ``answers`` gives the gold answers.
    """

    name: str
    hub: tuple[str, str | None]  # load_dataset(path, config)
    columns: tuple[str, ...]  # the row fields the loader reads
    template: str
    fields: Callable[[Row], dict[str, str]]
    label_words: tuple[str, ...] | None = None
    answers: Callable[[Row], list[str]] | None = None

    @property
    def is_generation(self) -> bool:
        return self.label_words is None


def _strip(*names: str) -> Callable[[Row], dict[str, str]]:
    return lambda row: {name: str(row[name]).strip() for name in names}


def _boolq_fields(row: Row) -> dict[str, str]:
    # MeZO's BoolQTemplate: the question gets a capital letter and a question mark.
    question = str(row["question"]).strip()
    if not question.endswith("?"):
        question += "?"
    return {"passage": str(row["passage"]).strip(), "question": question[:1].upper() + question[1:]}


def _wsc_fields(row: Row) -> dict[str, str]:
    return {
        "text": str(row["text"]).strip(),
        "span1": str(row["span1_text"]),
        "span2": str(row["span2_text"]).lower(),
    }


def _copa_fields(row: Row) -> dict[str, str]:
    # MeZO's CopaCLSTemplate: "The man broke his toe because?" / "... so?"
    if row["question"] not in ("cause", "effect"):
        raise ValueError(f"COPA question must be 'cause' or 'effect', got {row['question']!r}")
    premise = str(row["premise"]).rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conjunction = "because" if row["question"] == "cause" else "so"
    return {
        "stem": f"{premise} {conjunction}?",
        "choice1": str(row["choice1"]).strip(),
        "choice2": str(row["choice2"]).strip(),
    }


PAPER_TASKS: dict[str, PaperTask] = {
    task.name: task
    for task in (
        PaperTask(
            "SST-2",
            hub=("nyu-mll/glue", "sst2"),
            columns=("sentence",),
            template="{sentence} It was",
            fields=_strip("sentence"),
            label_words=(" terrible", " great"),
        ),
        PaperTask(
            "RTE",
            hub=("aps/super_glue", "rte"),
            columns=("premise", "hypothesis"),
            template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            fields=_strip("premise", "hypothesis"),
            label_words=("Yes", "No"),
        ),
        PaperTask(
            "CB",
            hub=("aps/super_glue", "cb"),
            columns=("premise", "hypothesis"),
            template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            fields=_strip("premise", "hypothesis"),
            label_words=("Yes", "No", "Maybe"),
        ),
        PaperTask(
            "BoolQ",
            hub=("aps/super_glue", "boolq"),
            columns=("question", "passage"),
            template="{passage} {question}",
            fields=_boolq_fields,
            label_words=(" No", " Yes"),
        ),
        PaperTask(
            "WSC",
            hub=("aps/super_glue", "wsc.fixed"),
            columns=("text", "span1_text", "span2_text"),
            template='{text}\nIn the previous sentence, does the pronoun "{span2}" refer to {span1}? '
            "Yes or No?\n",
            fields=_wsc_fields,
            label_words=("No", "Yes"),
        ),
        PaperTask(
            "WIC",
            hub=("aps/super_glue", "wic"),
            columns=("word", "sentence1", "sentence2"),
            template='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
            "{sentence1}\n{sentence2}\n",
            fields=_strip("word", "sentence1", "sentence2"),
            label_words=("No", "Yes"),
        ),
        PaperTask(
            "MultiRC",
            hub=("aps/super_glue", "multirc"),
            columns=("paragraph", "question", "answer"),
            template='{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? '
            "Yes or No?\n",
            fields=_strip("paragraph", "question", "answer"),
            label_words=("No", "Yes"),
        ),
        PaperTask(
            "COPA",
            hub=("aps/super_glue", "copa"),
            columns=("premise", "choice1", "choice2", "question"),
            template="{stem}\nChoice A: {choice1}\nChoice B: {choice2}\n"
            "Which choice makes more sense? A or B:",
            fields=_copa_fields,
            label_words=(" A", " B"),
        ),
        PaperTask(
            "ReCoRD",
            hub=("aps/super_glue", "record"),
            columns=("passage", "query", "answers"),
            template='{passage}\n{query}\nQuestion: what is the "@placeholder"\nAnswer:',
            fields=_strip("passage", "query"),
            answers=lambda row: [str(a) for a in row["answers"]],
        ),
        PaperTask(
            "SQuAD",
            hub=("rajpurkar/squad", None),
            columns=("title", "context", "question", "answers"),
            template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
            fields=_strip("title", "context", "question"),
            answers=lambda row: [str(a) for a in row["answers"]["text"]],
        ),
        PaperTask(
            "DROP",
            hub=("ucinlp/drop", None),
            columns=("passage", "question", "answers_spans"),
            template="Passage: {passage}\nQuestion: {question}\nAnswer:",
            fields=_strip("passage", "question"),
            answers=lambda row: [str(a) for a in row["answers_spans"]["spans"]],
        ),
    )
}


def canonical_name(name: str) -> str | None:
    """The registry spelling of a paper task, ignoring case, '-' and '_' ("sst2" -> "SST-2")."""
    key = re.sub(r"[-_\s]", "", name).lower()
    for canonical in PAPER_TASKS:
        if re.sub(r"[-_]", "", canonical).lower() == key:
            return canonical
    return None


def _spec(name: str) -> PaperTask:
    canonical = canonical_name(name)
    if canonical is None:
        raise ValueError(f"unknown paper task {name!r}; choose one of {sorted(PAPER_TASKS)}")
    return PAPER_TASKS[canonical]


def _raw_splits(spec: PaperTask, data_dir: str | Path | None) -> dict[str, list[Row]]:
    """{"train", "validation"[, "test"]} -> rows, from local jsonl files or from the hub."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir {folder} for task {spec.name} is not a folder")
        splits = {}
        for split in ("train", "validation", "test"):
            path = folder / f"{split}.jsonl"
            if path.is_file():
                splits[split] = read_jsonl(path)
            elif split != "test":
                raise FileNotFoundError(
                    f"task {spec.name}: {path} is missing; data_dir needs train.jsonl and "
                    "validation.jsonl (test.jsonl is optional)"
                )
        return splits
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ModuleNotFoundError(
            f"task {spec.name} downloads its data with Hugging Face datasets, which is not installed: "
            "pip install datasets, or pass data_dir=<folder with train.jsonl and validation.jsonl>"
        ) from err
    path, config = spec.hub
    dataset = load_dataset(path, config)
    # The hub's test splits hide their labels (-1), so they are never used.
    return {"train": list(dataset["train"]), "validation": list(dataset["validation"])}


def _check_columns(spec: PaperTask, rows: Sequence[Row], split: str, extra: tuple[str, ...]) -> None:
    for number, row in enumerate(rows, start=1):
        missing = [c for c in spec.columns + extra if c not in row]
        if missing:
            raise ValueError(
                f"task {spec.name}, {split} row {number}: missing fields {missing}; rows need "
                f"{list(spec.columns + extra)} (the Hugging Face dataset's field names)"
            )


def _sample(
    spec: PaperTask, splits: dict[str, list[Any]], seed: int, n_train: int, n_val: int, n_test: int
) -> tuple[list[Any], list[Any], list[Any]]:
    if "test" in splits:
        return (
            subsample(splits["train"], n_train, seed),
            subsample(splits["validation"], n_val, seed),
            subsample(splits["test"], n_test, seed),
        )
    return mezo_sample(
        splits["train"], splits["validation"], n_train=n_train, n_val=n_val, n_test=n_test, seed=seed
    )


def _to_example(spec: PaperTask, row: Row, split: str, number: int) -> Example:
    label = row["label"]
    if isinstance(label, bool):
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < len(spec.label_words):
        raise ValueError(
            f"task {spec.name}, {split} row {number}: label {label!r} is not one of "
            f"0..{len(spec.label_words) - 1} (hidden test labels, -1, cannot be used)"
        )
    return Example(spec.fields(row), label)


def load_paper_task(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
    label_words: Sequence[str] | None = None,
    template: str | None = None,
) -> ClassificationTask:
    """One of the papers' classification tasks, sampled as MeZO samples it.

    Args:
        name: "SST-2", "RTE", "CB", "BoolQ", "WSC", "WIC", "MultiRC" or "COPA" (any case).
        data_dir: a folder with train.jsonl / validation.jsonl [/ test.jsonl]; without it the data
            comes from Hugging Face ``datasets``.
        seed, n_train, n_val, n_test: see the module docstring.
        label_words, template: replace the MeZO prompt (one word per class, in label order).

    Example::

        task = load_paper_task("sst2", data_dir="data/sst2")
        task.prompt(task.train[0])   # '... It was'; the label word is ' terrible' or ' great'
    """
    spec = _spec(name)
    if spec.is_generation:
        raise GenerationTaskError(
            f"task {spec.name} is a generation task; zo_fx's trainer currently supports classification "
            f"tasks: {classification_task_names()}, 'vader', or a jsonl file. "
            f"load_generation_task({spec.name!r}) loads its data and prompts"
        )
    if label_words is not None and len(label_words) != len(spec.label_words):
        raise ValueError(
            f"task {spec.name} has {len(spec.label_words)} classes but {len(label_words)} label "
            f"words were given: {list(label_words)!r}"
        )
    raw = _raw_splits(spec, data_dir)
    for split, rows in raw.items():
        _check_columns(spec, rows, split, ("label",))
    converted = {
        split: [_to_example(spec, row, split, i) for i, row in enumerate(rows, start=1)]
        for split, rows in raw.items()
    }
    train, validation, test = _sample(spec, converted, seed, n_train, n_val, n_test)
    source = data_dir if data_dir is not None else f"datasets.load_dataset{spec.hub}"
    return ClassificationTask(
        name=spec.name,
        template=template if template is not None else spec.template,
        label_words=list(label_words if label_words is not None else spec.label_words),
        train=train,
        validation=validation,
        test=test,
        description=f"{spec.name} from {source}, MeZO sampling with seed {seed}",
    )


def load_generation_task(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
) -> GenerationTask:
    """ReCoRD, SQuAD or DROP: data and MeZO's prompts, sampled like the classification tasks."""
    spec = _spec(name)
    if not spec.is_generation:
        raise ValueError(f"task {spec.name} is a classification task; use load_paper_task({spec.name!r})")
    raw = _raw_splits(spec, data_dir)
    for split, rows in raw.items():
        _check_columns(spec, rows, split, ())
    converted = {
        split: [GenerationExample(spec.fields(row), spec.answers(row)) for row in rows]
        for split, rows in raw.items()
    }
    train, validation, test = _sample(spec, converted, seed, n_train, n_val, n_test)
    return GenerationTask(
        name=spec.name,
        template=spec.template,
        train=train,
        validation=validation,
        test=test,
        description=f"{spec.name}, MeZO sampling with seed {seed}",
    )


def classification_task_names() -> list[str]:
    return [name for name, spec in PAPER_TASKS.items() if not spec.is_generation]


def generation_task_names() -> list[str]:
    return [name for name, spec in PAPER_TASKS.items() if spec.is_generation]
