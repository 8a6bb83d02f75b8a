"""``--label-words``: the text a user writes, turned into the word of each class.

Label words reach the job as one string; this module parses its forms (``label=word`` pairs,
a class-ordered list, or JSON) and puts the space before each word that a template not ending
in whitespace needs, so that every word tokenizes as it would follow the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from zo_fx.finetune.config import FinetuneError


def parse_label_words(text: str | None) -> list[str] | dict[str, str] | None:
    """``--label-words``: ``pos=great,neg=terrible``; ``negative,positive``; or a JSON object / list."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped[:1] in "{[":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise FinetuneError(
                f"--label-words {text!r} looks like JSON but does not parse ({err.msg})") from None
        if isinstance(value, dict) and all(isinstance(w, str) for w in value.values()):
            return {str(k): w for k, w in value.items()}
        if isinstance(value, list) and all(isinstance(w, str) for w in value):
            return value
        raise FinetuneError(f"--label-words JSON must map labels to words or list words; got {text!r}")
    parts = [p for p in stripped.split(",") if p.strip()]
    if all("=" in p for p in parts) and parts:
        pairs = [p.split("=", 1) for p in parts]
        return {k.strip(): w.strip() for k, w in pairs}
    if any("=" in p for p in parts):
        raise FinetuneError(
            f"--label-words {text!r} mixes 'label=word' and bare words; write every class as label=word "
            "(e.g. pos=great,neg=terrible) or list the words in class order (negative,positive)"
        )
    return [p.strip() for p in parts]


def spaced_label_words(words, template: str):
    """Put a space before each word that will follow a template not ending in whitespace."""
    if template[-1:].isspace():
        return words

    def fix(word: str) -> str:
        return word if word[:1].isspace() else " " + word

    return {k: fix(w) for k, w in words.items()} if isinstance(words, Mapping) else [fix(w) for w in words]
