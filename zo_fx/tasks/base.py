"""Prompt-based classification tasks, scored as MeZO scores them.

MeZO's ``train_as_classification`` (Malladi et al. 2023, ``large_models/trainer.py``) turns
a label into a word: the prompt is written so that the next token is the label word, and
the loss is cross-entropy over the logits of the candidate label words at the position that
predicts that token. A ``ClassificationTask`` holds what that needs: a template that ends
right before the label word, one word per class, and the examples of each split.
``encode`` makes a right-padded batch whose last real position, ``attention_mask.sum(1) - 1``,
is the one that predicts the label word; ``label_token_ids`` gives the candidate token ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from zo_fx.tasks.batching import BatchCursor, iter_batches
from zo_fx.tasks.splits import demonstration_indices

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One labelled example: the text fields the template fills in, and the class index."""

    fields: dict[str, str]
    label: int


def template_slots(template: str) -> set[str]:
    """The ``{name}`` slots of a ``str.format`` template."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(
            f"template {template!r} is not a valid format string ({err}); "
            "write a literal brace as '{{' or '}}'"
        ) from err


@dataclass
class ClassificationTask:
    """A prompt template, one label word per class, and the examples of each split.

    Args:
        name: used in messages and run records.
        template: a ``str.format`` template with one slot per text field of the examples, e.g.
            ``"{sentence} It was"``. It must end right where the label word begins.
        label_words: the word for each class index, written as it follows the prompt (with the
            leading space when the prompt does not end in whitespace: ``" great"``).
        train, validation, test: the examples of each split.
        description: where the data came from and how it was split, for run records.
    """

    name: str
    template: str
    label_words: list[str]
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    description: str = ""
    demonstrations: str = ""
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.label_words) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 label words, got {self.label_words!r}")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r} has repeated label words: {self.label_words!r}")
        slots = template_slots(self.template)
        if not slots:
            raise ValueError(f"template {self.template!r} of task {self.name!r} has no {{field}} slot")
        if self.template[-1:].isspace():
            spaced = [w for w in self.label_words if w[:1].isspace()]
            if spaced:
                raise ValueError(
                    f"template of task {self.name!r} ends in whitespace and label words {spaced!r} start "
                    "with it: the model would see two spaces; drop one of them"
                )
        for split in SPLITS:
            for i, example in enumerate(getattr(self, split)):
                missing = slots - example.fields.keys()
                if missing:
                    raise ValueError(
                        f"example {i} of split {split!r} of task {self.name!r} lacks fields "
                        f"{sorted(missing)} used by the template {self.template!r}"
                    )
                if not 0 <= example.label < len(self.label_words):
                    raise ValueError(
                        f"example {i} of split {split!r} of task {self.name!r} has label {example.label}, "
                        f"outside 0..{len(self.label_words) - 1} (label words {self.label_words!r})"
                    )
        used = {e.label for split in SPLITS for e in getattr(self, split)}
        unused = [w for c, w in enumerate(self.label_words) if c not in used]
        if used and unused:
            raise ValueError(
                f"no example of task {self.name!r} has the class of label words {unused!r}: a class no example "
                "uses would only take probability away from the others. Remove it from the label words, or "
                "add examples of it."
            )

    def fingerprint(self) -> str:
        """sha256 of every example of every split (fields and label): what a resumed run must train on."""
        digest = hashlib.sha256(self.demonstrations.encode())
        for split in SPLITS:
            for e in getattr(self, split):
                digest.update(json.dumps([split, e.fields, e.label], sort_keys=True).encode())
        return digest.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def split(self, split: str) -> list[Example]:
        """The examples of ``split``; an empty or unknown split is an error, not an empty loop."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        examples = getattr(self, split)
        if not examples:
            raise ValueError(
                f"split {split!r} of task {self.name!r} has no examples; give it some (for the built-in "
                f"tasks raise n_train/n_val/n_test, or pass data_dir with a larger {split}.jsonl; a user "
                "jsonl file is split 80/10/10 by text, so it needs a few dozen lines)"
            )
        return examples

    def class_counts(self, split: str) -> list[int]:
        """How many examples of each class ``split`` holds (zero for an empty split)."""
        counts = [0] * self.num_classes
        for example in getattr(self, split):
            counts[example.label] += 1
        return counts

    def prompt(self, example: Example) -> str:
        """The text the model reads; the label word would follow it directly."""
        return self.demonstrations + self.template.format_map(example.fields)

    def with_demonstrations(self, k: int, seed: int, separator: str = "\n\n") -> ClassificationTask:
        """This task with ``k`` solved training examples before every prompt (in-context learning).

        The same ``k`` examples, drawn from the train split by ``seed``, precede every prompt of
        every split (MeZO's ICL baseline draws them once per run the same way); each is its
        prompt followed by its label word. ``k = 0`` is the task itself.
        """
        if k == 0:
            return self
        train = self.split("train")
        chosen = demonstration_indices(len(train), k, seed, self.name)
        shots = [self.template.format_map(train[i].fields) + self.label_words[train[i].label] for i in chosen]
        return dataclasses.replace(self, demonstrations=separator.join(shots) + separator)

    def for_masked_lm(self, tokenizer: Any) -> ClassificationTask:
        """This task encoded for a masked LM: a mask token where the label word goes, read at that position."""
        mask = getattr(tokenizer, "mask_token_id", None)
        if mask is None:
            raise ValueError(f"the tokenizer of this masked LM has no mask token, so task {self.name!r} has "
                             "no position for the label word; use a tokenizer with a mask token")
        return dataclasses.replace(self, mask_token_id=int(mask))

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """The token id of each label word, in class order.

        A label word must be exactly one token: the loss compares the logits of the
        candidates at one position. The first example's prompt is also checked to tokenize
        to the same tokens with and without the label word appended, i.e. that the word does
        not merge with the end of the prompt.
        """
        ids = []
        for word in self.label_words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                shown = tokenizer.convert_ids_to_tokens(pieces)
                raise ValueError(
                    f"label word {word!r} of task {self.name!r} is {len(pieces)} tokens for this tokenizer "
                    f"({shown}, ids {pieces}); each label word must be a single token. Choose other label "
                    "words (--label-words), e.g. common short words with a leading space such as "
                    "' yes'/' no' or ' good'/' bad'"
                )
            if getattr(tokenizer, "unk_token_id", None) is not None and pieces[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"label word {word!r} of task {self.name!r} is the tokenizer's unknown token "
                    f"({tokenizer.unk_token!r}): the model cannot tell it from any other unknown word. Choose "
                    "label words in the tokenizer's vocabulary (--label-words)"
                )
            if pieces[0] in ids:
                other = self.label_words[ids.index(pieces[0])]
                raise ValueError(
                    f"label words {other!r} and {word!r} of task {self.name!r} are the same token (id "
                    f"{pieces[0]}): the classes could not be told apart. Choose distinct label words"
                )
            ids.append(pieces[0])
        example = next((e for s in SPLITS for e in getattr(self, s)), None)
        if example is not None:
            prompt = self.prompt(example)
            alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for word, token in zip(self.label_words, ids):
                joined = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
                if joined != alone + [token]:
                    raise ValueError(
                        f"label word {word!r} does not follow the prompt of task {self.name!r} as its own "
                        f"token: the prompt ends {tokenizer.convert_ids_to_tokens(alone[-3:])} but "
                        f"prompt+word ends {tokenizer.convert_ids_to_tokens(joined[-4:])}. End the template "
                        "right before the label word (e.g. with ':' or a word), or choose other label words"
                    )
        return ids

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        max_length: int,
        *,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> dict[str, torch.Tensor]:
        """A right-padded batch whose last real position predicts each example's label word.

        For a masked LM (``mask_token_id`` set) the prompt is followed by the mask token, which
        the label word replaces, and then by the special tokens the tokenizer appends (SEP/EOS).

        Returns ``input_ids`` and ``attention_mask`` (int64 ``[B, T]``) and ``class_labels``
        (int64 ``[B]``, an index into ``label_words``). Special tokens the tokenizer puts
        before a text (BOS) are kept; ones it appends (EOS, SEP) are dropped, since the label
        word must come right after the prompt. A prompt longer than ``max_length`` loses
        tokens from its start, after any BOS, because its end holds the question.
        ``padding="max_length"`` pads every batch to ``max_length`` (one shape for a compiled
        step); ``"longest"`` pads to the longest prompt of the batch.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if not examples:
            raise ValueError(f"no examples to encode for task {self.name!r}")
        prompts = [self.prompt(e) for e in examples]
        bodies = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        fulls = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        rows = []
        for body, full in zip(bodies, fulls):
            prefix = _special_prefix(full, body)
            tail = [] if self.mask_token_id is None else [self.mask_token_id] + full[len(prefix) + len(body):]
            room = max_length - len(prefix) - len(tail)
            if room < 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for the prompt after {len(prefix) + len(tail)} "
                    "special tokens"
                )
            rows.append(prefix + body[-room:] + tail)
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        pad_id = _pad_id(tokenizer)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, : len(row)] = 1
        class_labels = torch.tensor([e.label for e in examples], dtype=torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "class_labels": class_labels}

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> Iterator[list[Example]]:
        """The batches of one epoch of ``split`` in the order fixed by ``(seed, epoch)``,
        from batch number ``start`` on (see ``batching.iter_batches``)."""
        return iter_batches(
            self.split(split),
            batch_size,
            seed=seed,
            epoch=epoch,
            start=start,
            shuffle=shuffle,
            drop_last=drop_last,
        )

    def cursor(self, batch_size: int, *, seed: int = 0, split: str = "train") -> BatchCursor:
        """An endless, resumable stream of full training batches (see ``batching.BatchCursor``)."""
        return BatchCursor(self.split(split), batch_size, seed=seed)

    def summary(self) -> str:
        """One line per split with the class counts, for logs and run records."""
        lines = [f"task {self.name}: label words {self.label_words!r}"]
        for split in SPLITS:
            counts = self.class_counts(split)
            per_class = ", ".join(f"{w.strip()}={c}" for w, c in zip(self.label_words, counts))
            lines.append(f"  {split}: {sum(counts)} ({per_class})")
        return "\n".join(lines)


def _special_prefix(full: list[int], body: list[int]) -> list[int]:
    """The tokens ``add_special_tokens=True`` put before ``body`` inside ``full``."""
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return full[:start]
    return []


def _pad_id(tokenizer: Any) -> int:
    """Padding never reaches the loss (it sits after the scored position), so any id will do."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
