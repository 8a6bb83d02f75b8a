"""A reward task: prompts per split, the columns their reward functions read, and those functions.

Built-in ones are made from a seed (:mod:`zo_fx.tasks.countdown`); :func:`prompts_from_jsonl` reads
a user's file (``{"prompt": ..., ...}`` lines, every other field a column for the rewards; split
80/10/10 by prompt) or a folder of ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from zo_fx.tasks.batching import BatchCursor
from zo_fx.tasks.jsonl import read_jsonl
from zo_fx.tasks.splits import hash_split

SPLITS = ("train", "validation", "test")


@dataclass
class RewardTask:
    """Prompts with the columns their reward reads, per split, and the reward functions (with weights)."""

    name: str
    description: str
    rewards: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    def split(self, name: str) -> list[dict]:
        examples = getattr(self, name)
        if not examples:
            raise ValueError(f"split {name!r} of task {self.name} has no examples")
        return examples

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(getattr(self, s))}" for s in SPLITS)
        return f"task {self.name}: {self.description} ({sizes})"

    def cursor(self, batch_size: int, *, seed: int = 0, split: str = "train") -> BatchCursor:
        return BatchCursor(self.split(split), batch_size, seed=seed)

    def fingerprint(self) -> str:
        """sha256 of every example of every split: what a resumed run must train on."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for example in getattr(self, split):
                digest.update(json.dumps([split, example], sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def subsample(self, sizes: dict) -> RewardTask:
        """The first ``sizes[split]`` examples of each split (None keeps the split whole)."""
        kept = {s: getattr(self, s)[:sizes[s]] if sizes.get(s) is not None else getattr(self, s) for s in SPLITS}
        return RewardTask(self.name, self.description, self.rewards, self.weights, **kept)


def _check_rows(rows: list[dict], where: str) -> list[dict]:
    for i, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}, example {i}: needs a non-empty string \"prompt\"")
    return rows


def prompts_from_jsonl(path: str | Path, rewards: list, weights: list) -> RewardTask:
    """A reward task from a jsonl file (split 80/10/10 by prompt) or a folder with the three splits."""
    path = Path(path)
    if path.is_dir():
        splits = {s: _check_rows(read_jsonl(path / f"{s}.jsonl"), str(path / f"{s}.jsonl")) for s in SPLITS}
    else:
        rows = _check_rows(read_jsonl(path), str(path))
        splits = dict(zip(SPLITS, hash_split(rows, key=lambda row: row["prompt"])))
    names = ", ".join(getattr(f, "__name__", "reward") for f in rewards)
    return RewardTask(path.stem or path.name, f"prompts of {path.name}, rewards {names}", rewards, weights, **splits)
