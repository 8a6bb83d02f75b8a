"""The default task: is a word positive or negative, as ten human raters judged it.

The VADER lexicon (Hutto & Gilbert 2014) ships inside the ``vaderSentiment`` package, so
this task needs no network and no dataset download. Each line of ``vader_lexicon.txt`` is
tab-separated: token, mean valence (-4..+4), standard deviation, and the ten raters' scores.

What is kept, and why:

* each word once (the lexicon rates a few twice; the later rating wins);
* only plain words, ``^[a-z][a-z'-]*$``: the lexicon also rates emoticons (``:)``, ``</3``)
  and a few odd tokens, which make poor prompts for a word-level question;
* only clear-cut words, ``mean >= +threshold`` (positive, label 1) or
  ``mean <= -threshold`` (negative, label 0), default threshold 1.0; the words in between
  are the ones raters did not agree were sentimental, and are dropped.

Split: by a blake2b hash of the word, 80/10/10 (``splits.hash_split``), fixed for all seeds,
disjoint by construction. The optional ``n_train``/``n_val``/``n_test`` then subsample each
split with the seed.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from zo_fx.tasks.base import ClassificationTask, Example
from zo_fx.tasks.splits import hash_split, subsample

TEMPLATE = "Word: {text}\nSentiment (positive or negative):"
LABEL_WORDS = [" negative", " positive"]  # class 0, class 1; one token each in SmolLM2's and GPT-2's BPE

_PLAIN_WORD = re.compile(r"^[a-z][a-z'-]*$")


def vader_lexicon_path() -> Path:
    """``vader_lexicon.txt`` of the installed ``vaderSentiment`` distribution (not imported)."""
    try:
        dist = importlib.metadata.distribution("vaderSentiment")
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(
            "the 'vader' task reads the VADER lexicon from the vaderSentiment package: "
            "pip install vaderSentiment (or pass lexicon_path=...)"
        ) from err
    for file in dist.files or ():
        if file.name == "vader_lexicon.txt":
            return Path(dist.locate_file(file))
    raise FileNotFoundError(f"vaderSentiment {dist.version} is installed but has no vader_lexicon.txt")


def read_vader_lexicon(path: str | Path, *, threshold: float = 1.0) -> list[Example]:
    """The clear-cut plain words of the lexicon as examples with field ``text``, in file order."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 so that the classes do not overlap, got {threshold}")
    valences: dict[str, float] = {}
    # The lexicon has CRLF line endings (splitlines() handles them) and rates a few words twice
    # ('ok', 'lol', 'sob', ...); the later rating wins, as in vaderSentiment's own make_lex_dict.
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        if _PLAIN_WORD.match(token):
            valences[token] = float(mean)
    examples = []
    for word, valence in valences.items():
        if valence >= threshold:
            examples.append(Example({"text": word}, 1))
        elif valence <= -threshold:
            examples.append(Example({"text": word}, 0))
    return examples


def load_vader_task(
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    threshold: float = 1.0,
    template: str = TEMPLATE,
    label_words: list[str] | None = None,
    lexicon_path: str | Path | None = None,
) -> ClassificationTask:
    """Word sentiment from the VADER lexicon (see the module docstring).

    Example::

        task = load_vader_task(n_train=1000)
        task.prompt(task.train[0])   # 'Word: ...\\nSentiment (positive or negative):'
    """
    path = Path(lexicon_path) if lexicon_path is not None else vader_lexicon_path()
    train, validation, test = hash_split(
        read_vader_lexicon(path, threshold=threshold), key=lambda e: e.fields["text"]
    )
    return ClassificationTask(
        name="vader",
        template=template,
        label_words=list(label_words or LABEL_WORDS),
        train=subsample(train, n_train, seed),
        validation=subsample(validation, n_val, seed),
        test=subsample(test, n_test, seed),
        description=f"VADER words with |mean valence| >= {threshold}, split 80/10/10 by blake2b(word)",
    )
