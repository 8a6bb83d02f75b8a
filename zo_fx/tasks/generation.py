"""Generation tasks (ReCoRD, SQuAD, DROP): data and prompts only.

MeZO also fine-tunes on these, with the token cross-entropy of the gold answer as the loss
and exact match / F1 as the metrics. zo_fx's trainer runs classification tasks only, so
these tasks can be loaded and inspected but not trained; asking for one as a
classification task raises ``GenerationTaskError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class GenerationTaskError(NotImplementedError):
    """A generation task was asked for where only classification tasks are supported."""


@dataclass(frozen=True)
class GenerationExample:
    """The text fields the template fills in, and every accepted answer (the first is the target)."""

    fields: dict[str, str]
    answers: list[str]


@dataclass
class GenerationTask:
    """A prompt template ending where the answer begins, and the examples of each split."""

    name: str
    template: str
    train: list[GenerationExample] = field(default_factory=list)
    validation: list[GenerationExample] = field(default_factory=list)
    test: list[GenerationExample] = field(default_factory=list)
    description: str = ""

    def prompt(self, example: GenerationExample) -> str:
        return self.template.format_map(example.fields)
