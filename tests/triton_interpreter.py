"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton decides between interpreter and compiler when a kernel is decorated, i.e. when its
module is imported. Kernel test modules call :func:`device_for_kernels` before importing
``zo_fx.kernels``; if another test module imported the kernels first (compiled mode), they
are reloaded so the switch takes effect.
"""

import importlib
import os
import sys

import torch

KERNEL_MODULES = ("zo_fx.kernels.tiles", "zo_fx.kernels.linear", "zo_fx.kernels.update", "zo_fx.kernels.embedding")


def device_for_kernels() -> str:
    """``"cuda"`` with a GPU; otherwise ``"cpu"``, with the kernels switched to the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from zo_fx.kernels import _support

    if _support.kernels_interpreted() is False:
        for name in KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return "cpu"
