"""Crash-safe file writes: a file is either its old content or its new content, never half of one.

Every file zo_fx writes that a later run reads (trajectories, checkpoints, metrics,
final weights, plots) goes through :func:`atomic_path`: the content is written to a
temporary file beside the target, flushed to disk, and renamed over the target, which
POSIX makes atomic. A crash at any moment leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
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


class WriteError(OSError):
    """A file zo_fx writes could not be written; the message says what, why, and how much space it needed."""

    def __str__(self) -> str:
        return str(self.strerror)


_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file size limit was reached (see `ulimit -f`)",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "an input/output error of the device",
}


def free_bytes(path) -> int | None:
    """Free space on the file system of ``path`` (or of its nearest existing parent), None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _os_errno(err: BaseException) -> int | None:
    """The errno behind a write failure: an ``OSError``'s, or the ``(os error N)`` that Rust writers such as
    safetensors put in their own exception's message; None for any other error."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


@contextmanager
def writing(what: str, path, needed: int | None = None) -> Iterator[None]:
    """Turn an OS error raised while writing ``what`` to ``path`` into a :class:`WriteError` that says
    what failed, the cause, the space needed (when known) and the space free."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        code = _os_errno(err)
        if code is None and not isinstance(err, OSError):
            raise
        cause = _CAUSES.get(code, os.strerror(code) if code else type(err).__name__)
        detail = os.strerror(code) if code else str(err)
        space = f"; it needs about {human_bytes(needed)}" if needed else ""
        free = free_bytes(path)
        free_text = f", {human_bytes(free)} free there" if free is not None else ""
        raise WriteError(code, f"could not write {what} to {path}: {cause} ({detail}){space}{free_text}") from err


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
