"""What every kernel module needs from Triton, and what it does when Triton is missing.

zo_fx runs without Triton (CPU machines, macOS): the torch references in each kernel
module are the specification and stay importable. So the kernel modules take ``triton``
and ``tl`` from here; when the import fails they get a stand-in whose decorators leave
the functions undecorated. Those functions are never launched then, because
:func:`zo_fx.kernels.dispatch.pick` only answers ``"triton"`` when Triton is importable.
"""

from __future__ import annotations

import os
import sys

import torch

from zo_fx.streams.layout import check_pid, seed_words

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    HAS_TRITON = False

    class _NoTriton:
        """Just enough of ``triton`` / ``triton.language`` for the kernel modules to import."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda f: f

        @staticmethod
        def Config(*_, **__):  # noqa: N802 - mirrors triton.Config
            return None

    triton = tl = _NoTriton()


#: parameter dtypes the kernels take; float64 stays on the torch path (see pick()).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool | None:
    """How the already-imported kernels were built: True interpreted, False compiled, None not yet.

    Triton decides at decoration time (module import), not at launch, so a process that
    imported ``zo_fx.kernels.tiles`` before setting ``TRITON_INTERPRET=1`` holds compiled
    kernels that cannot take CPU tensors. :func:`zo_fx.kernels.dispatch.pick` checks this.
    """
    module = sys.modules.get("zo_fx.kernels.tiles")
    if module is None or not HAS_TRITON:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module._philox_kernel, InterpretedFunction)


def key_words(seeds, pid: int, device) -> torch.Tensor:
    """int64 ``[G, 3]`` rows (seed mod 2**32, seed div 2**32, pid): one direction's Philox key words.

    Kernels read their keys from a tensor rather than from scalar arguments: Triton
    types an integer argument by its value (int32, uint32, int64) and specialises the
    value 1 into a constant, so a tensor is the one spelling that means the same on
    every Triton version.
    """
    pid = check_pid(pid)
    rows = [(*seed_words(s), pid) for s in seeds]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), 3)
