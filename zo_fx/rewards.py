"""Rewards over generated text, called as TRL's ``GRPOTrainer`` calls them.

A reward function takes keyword arguments only: ``prompts`` and ``completions`` (lists of
strings, one per example) and every other field of the examples as a column of the same
length, and returns one ``float`` (or ``None``: not scorable) per example::

    def my_reward(completions, answer, **kwargs) -> list[float | None]: ...

so users' existing TRL reward functions work unchanged. :func:`score` calls several with
weights and turns an exception, a ``None`` or a NaN into "no reward for this example",
counted and named, never a stopped run. Built in: :func:`exact_match` and :func:`token_f1`
(SQuAD's answer normalisation, best over the accepted answers), :func:`number_match` (the
last number of the completion against the answer), :func:`regex_reward`, and
:func:`answer_format` (an ``<answer>...</answer>`` span, as TinyZero-style tasks ask).
None of them evaluates text as code.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RewardFn = Callable[..., Sequence[float | None]]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _answers_of(columns: dict, i: int) -> list[str]:
    """The accepted answers of example ``i``: column ``answers`` (a list or one string) or ``answer``."""
    for key in ("answers", "answer", "solution", "target"):
        if key in columns:
            value = columns[key][i]
            if isinstance(value, dict) and "text" in value:  # SQuAD's {"text": [...], "answer_start": [...]}
                value = value["text"]
            values = value if isinstance(value, (list, tuple)) else [value]
            return [str(v) for v in values]
    raise KeyError("the examples have no 'answers' or 'answer' column to compare the completions with")


def extract_answer(completion: str) -> str:
    """The text inside the last ``<answer>...</answer>``, else the completion's first line."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    lines = completion.strip().splitlines()
    return lines[0].strip() if lines else ""


def exact_match(completions: list[str], **columns) -> list[float]:
    """1.0 when the (extracted, normalised) completion equals an accepted answer, else 0.0."""
    out = []
    for i, completion in enumerate(completions):
        guess = normalize_answer(extract_answer(completion))
        out.append(float(any(guess == normalize_answer(a) for a in _answers_of(columns, i))))
    return out


def f1_score(prediction: str, truth: str) -> float:
    """SQuAD's token F1 of two strings after normalisation."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(completions: list[str], **columns) -> list[float]:
    """The best token F1 of the (extracted) completion over the accepted answers."""
    return [max(f1_score(extract_answer(c), a) for a in _answers_of(columns, i)) for i, c in enumerate(completions)]


def parse_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,234`` and ``-3.5`` included), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        return float(token)
    except ValueError:
        return None


def number_match(completions: list[str], **columns) -> list[float]:
    """1.0 when the last number of the (extracted) completion equals the answer's number."""
    out = []
    for i, completion in enumerate(completions):
        guess = parse_number(extract_answer(completion))
        truths = [parse_number(a) for a in _answers_of(columns, i)]
        out.append(float(guess is not None and any(t is not None and math.isclose(guess, t, rel_tol=1e-9,
                                                                                   abs_tol=1e-9) for t in truths)))
    return out


def answer_format(completions: list[str], **columns) -> list[float]:
    """1.0 for a completion with a non-empty ``<answer>...</answer>`` span, else 0.0."""
    return [float(any(t.strip() for t in _ANSWER_TAG.findall(c))) for c in completions]


def regex_reward(pattern: str, flags: int = 0) -> RewardFn:
    """A reward of 1.0 for completions that ``pattern`` matches (``re.search``), else 0.0."""
    compiled = re.compile(pattern, flags)

    def reward(completions: list[str], **columns) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    reward.__name__ = f"regex({pattern})"
    return reward


BUILT_IN: dict[str, RewardFn] = {
    "exact_match": exact_match, "f1": token_f1, "number": number_match, "format": answer_format,
}


def resolve(spec: str) -> tuple[RewardFn, float]:
    """``name`` or ``name:weight`` of a built-in reward, or ``module:function`` (``module:function:weight``)."""
    parts = spec.strip().split(":")
    weight = 1.0
    if len(parts) >= 2:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    if len(parts) == 1:
        name = parts[0]
        if name.startswith("regex="):
            return regex_reward(name[len("regex="):]), weight
        if name not in BUILT_IN:
            raise ValueError(f"unknown reward {name!r}: built in are {sorted(BUILT_IN)} and regex=PATTERN; a "
                             "function of your own is module:function")
        return BUILT_IN[name], weight
    if len(parts) == 2:
        module, name = parts
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward {spec!r}: cannot import {name} from {module} ({err})") from None
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: {module}.{name} is not callable")
        return fn, weight
    raise ValueError(f"reward {spec!r}: expected name, name:weight, module:function or module:function:weight")


@dataclass
class Scores:
    """Weighted rewards of a batch of completions: ``rewards[i]`` is NaN where example i failed."""

    rewards: list[float]
    per_function: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def score(funcs: Sequence[RewardFn], weights: Sequence[float], prompts: list[str], completions: list[str],
          columns: dict) -> Scores:
    """Call every reward function as TRL does and sum their weighted values per example.

    An example whose value from any function is missing (an exception, ``None``, NaN, a list of
    the wrong length) gets NaN, so the optimizer drops it from the step in every group alike.
    """
    n = len(completions)
    total = [0.0] * n
    failed = [False] * n
    per_function, failures = {}, []
    for fn, weight in zip(funcs, weights):
        name = getattr(fn, "__name__", type(fn).__name__)
        try:
            values = list(fn(prompts=prompts, completions=completions, **columns))
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
        except Exception as err:  # noqa: BLE001 - a reward that fails costs its examples, not the run
            failures.append(f"{name} raised {type(err).__name__}: {err}")
            failed = [True] * n
            continue
        good = []
        for i, v in enumerate(values):
            value = None if v is None else float(v)
            if value is None or not math.isfinite(value):
                failed[i] = True
                continue
            total[i] += weight * value
            good.append(value)
        bad = n - len(good)
        if bad:
            failures.append(f"{name} gave no finite value for {bad} of {n} completions")
        per_function[name] = sum(good) / len(good) if good else math.nan
    return Scores([math.nan if f else t for t, f in zip(total, failed)], per_function, failures)
