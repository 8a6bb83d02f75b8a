"""Stable stream ids: a parameter's direction depends on its name, never on its position.

The id is part of the frozen layout (``docs/directions.md``): a trajectory recorded on
one process replays on another because both derive the same 32-bit id from the same
canonical name, whatever other parameters the model has or in which order it lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


class ParamIdCollisionError(ValueError):
    """Two parameter names hash to the same 32-bit stream id."""


def stable_param_id(name: str) -> int:
    """32-bit stream id of a parameter: the first 4 bytes (little endian) of BLAKE2b-64(name)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little")


def assign_param_ids(names: Iterable[str]) -> dict[str, int]:
    """Stable ids for a set of parameter names; raises ``ParamIdCollisionError`` on a collision."""
    ids: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name in names:
        pid = stable_param_id(name)
        if pid in owner and owner[pid] != name:
            raise ParamIdCollisionError(
                f"parameters {owner[pid]!r} and {name!r} share the stream id {pid:#010x}; "
                "rename one of them (ids derive from the parameter name) so their directions differ"
            )
        owner[pid] = name
        ids[name] = pid
    return ids
