"""Deterministic batch order and a resumable cursor over it.

A zeroth-order run replays its directions from seeds; its data order must be just as
reproducible, or a resumed run would see different batches than the run it continues.
The order of epoch ``e`` is a pure function of ``(seed, e, len(split))``, and a
``DataPosition`` (epoch, batch index) is all that has to be checkpointed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``(seed, epoch)``.

    The two are mixed through blake2b rather than, say, ``seed * 1000 + epoch`` so that no two
    (seed, epoch) pairs share an order; ``random.Random`` seeded with an int and its
    ``shuffle`` are stable across Python versions and platforms.
    """
    digest = hashlib.blake2b(f"zo_fx.batches/{seed}/{epoch}".encode(), digest_size=8).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order


def iter_batches(
    items: Sequence[T],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[list[T]]:
    """Batches of one epoch, beginning with batch number ``start``.

    ``shuffle=False`` keeps the split's order (for evaluation). ``drop_last=True`` drops a final
    short batch, so that every training batch has the same shape and a compiled step is
    never re-traced for a smaller one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(len(items), seed=seed, epoch=epoch) if shuffle else list(range(len(items)))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for lo in range(start * batch_size, stop, batch_size):
        yield [items[i] for i in order[lo : lo + batch_size]]


@dataclass
class DataPosition:
    """Where a run is in its data: batch number ``index`` of epoch ``epoch`` is the next one."""

    epoch: int = 0
    index: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> DataPosition:
        return cls(epoch=int(state["epoch"]), index=int(state["index"]))


class BatchCursor:
    """An endless stream of full, shuffled training batches that can be saved and resumed.

    Every batch has exactly ``batch_size`` examples (the short remainder of each epoch is
    dropped), and epochs follow one another with a fresh order each. ``state_dict()`` records
    the position together with what fixes the order (split length, batch size, seed), and
    ``load_state_dict`` refuses a state from a different stream instead of silently
    resuming somewhere else.

    Example::

        cursor = BatchCursor(task.train, batch_size=16, seed=0)
        batch = cursor.next_batch()
        saved = cursor.state_dict()          # goes into the checkpoint
        resumed = BatchCursor(task.train, batch_size=16, seed=0)
        resumed.load_state_dict(saved)       # resumed.next_batch() == cursor.next_batch()
    """

    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(items) < batch_size:
            raise ValueError(
                f"cannot make batches of {batch_size} from {len(items)} examples; "
                "use a smaller batch size or more training examples (n_train)"
            )
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.position = DataPosition()
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def next_batch(self) -> list[T]:
        """The batch at ``position``; then advance, rolling over into the next epoch."""
        if self._order is None:
            self._order = epoch_order(len(self.items), seed=self.seed, epoch=self.position.epoch)
        lo = self.position.index * self.batch_size
        batch = [self.items[i] for i in self._order[lo : lo + self.batch_size]]
        self.position.index += 1
        if self.position.index == self.batches_per_epoch:
            self.position = DataPosition(epoch=self.position.epoch + 1, index=0)
            self._order = None
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            **self.position.state_dict(),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.items),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_examples"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"data cursor state has {key}={state[key]} but this stream has {key}={mine[key]}; "
                    "resume with the same task, sample sizes, seed and batch size as the saved run"
                )
        position = DataPosition.from_state_dict(state)
        if not 0 <= position.index < self.batches_per_epoch:
            raise ValueError(f"data cursor index {position.index} is outside 0..{self.batches_per_epoch - 1}")
        self.position = position
        self._order = None
