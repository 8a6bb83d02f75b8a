"""Preemption: SIGTERM (what a scheduler sends before it kills a job) ends a run at a step boundary, saved.

While steps run, the signal only sets a flag: the job finishes the step under way, writes a
checkpoint, and stops with :class:`RunStopped`, so ``--resume`` continues exactly where it
stopped. Outside the step loop (model load, evaluations, the final writes) nothing is gained by
waiting, so the signal stops the run at once; every file is written atomically, so what was
written before stays intact. Handlers are installed only in the main thread of a single process
(under ``torchrun`` the ranks must stop at the same step, which one signal cannot promise).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from zo_fx.finetune.config import FinetuneError

#: the exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it
SIGNAL_EXIT_BASE = 128


class RunStopped(FinetuneError):
    """The run was stopped by a signal; ``status`` is the exit status a shell expects (143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.status = SIGNAL_EXIT_BASE + int(signum)


class StopSignal:
    """Catches SIGTERM for one run: deferred to the end of the step while ``deferring``, at once otherwise."""

    def __init__(self):
        self.requested: str | None = None
        self.signum = signal.SIGTERM
        self.deferring = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested, self.signum = signal.Signals(signum).name, signum
        if not self.deferring:
            raise RunStopped(f"stopped by {self.requested} before training steps were under way; nothing of this "
                             "run's progress is lost (every file is written atomically)", signum)

    @contextlib.contextmanager
    def installed(self, active: bool = True):
        if not active or threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, self._previous)

    @contextlib.contextmanager
    def deferred(self):
        """Inside: a signal waits for the step under way to finish."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
