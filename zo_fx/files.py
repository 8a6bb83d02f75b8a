"""Crash-safe file writes: a file is either its old content or its new content, never half of one.

Every file zo_fx writes that a later run reads (trajectories, checkpoints, metrics,
final weights, plots) goes through :func:`atomic_path`: the content is written to a
temporary file beside the target, flushed to disk, and renamed over the target, which
POSIX makes atomic. A crash at any moment leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    The temporary name keeps the target's extension last (``model.tmp.safetensors``),
    so writers that check the extension accept it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}{suffix}{path.suffix}") if path.suffix else path.with_name(path.name + suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, **dumps_kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place (the target must not exist) and make it durable."""
    for child in tmp.rglob("*"):
        if child.is_file():
            _fsync_file(child)
    os.replace(tmp, final)
    fsync_dir(final.parent)
