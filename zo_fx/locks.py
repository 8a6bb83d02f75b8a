"""A run folder is written by one run at a time: a lock file with the writer's host and PID.

Two runs on one ``--output-dir`` would interleave their checkpoints, prune each other's
and leave ``LATEST`` pointing at a folder the other deleted. :class:`RunLock` makes the
second one stop before it touches anything. A lock left by a run that died (same host,
no such process) is stale: it is taken over, with a message. A lock from another host
cannot be checked from here, so it is refused with the file to delete if that run is
known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".zo_fx.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Held while a run writes ``folder``; ``release()`` (or the context manager) frees it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def acquire(cls, folder, *, log=print) -> RunLock:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunLockedError(f"cannot create the run folder {folder}: {err}") from None
        path = folder / LOCK_NAME
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = cls._holder(path)
                if holder is None:
                    continue  # the holder removed it meanwhile, or it is being written: try again
                pid = holder.get("pid")
                if holder.get("host") == me["host"] and isinstance(pid, int) and pid > 0 and not _alive(pid):
                    log(f"[zo_fx] taking over a stale lock on {folder}: its run (PID {holder.get('pid')}, started "
                        f"{holder.get('started')}) is no longer running")
                    path.unlink(missing_ok=True)
                    continue
                where = "this host" if holder.get("host") == me["host"] else f"host {holder.get('host')!r}"
                raise RunLockedError(
                    f"{folder} is being written by another run (PID {holder.get('pid')} on {where}, started "
                    f"{holder.get('started')}). Wait for it to finish or choose another --output-dir; if that "
                    f"run is gone, delete {path}."
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path)
        raise RunLockedError(
            f"could not take the lock {path}: it is unreadable or keeps changing. If no other run is starting on "
            f"{folder}, delete {path}."
        )

    @staticmethod
    def _holder(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            time.sleep(0.2)  # being written by the run that just created it
            return None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
