"""Perturbation-aware ops, each beside the torch reference that specifies it.

One module per op: the torch reference first (plain torch, runs anywhere, the
specification), then the Triton kernel and its launcher, then the ``<op>(..., impl=...)``
entry point that chooses between them through :func:`zo_fx.kernels.dispatch.pick`:

* :mod:`.perturb`: ``perturbed`` / ``perturbed_groups``, per-group copies of a parameter
  (torch only: the kernels never form one).
* :mod:`.linear`: ``grouped_linear`` (reference ``grouped_linear_reference``), G perturbed
  GEMMs from one load of each weight tile; ``perturbed_linear``, one group's product.
* :mod:`.blocked`: ``blocked_grouped_matmul``, the same G products on the CPU torch path,
  each weight walked once in cache-sized tiles (torch only).
* :mod:`.update`: ``fused_update_`` and ``adamezo_update_`` (references
  ``fused_update_reference_``, ``adamezo_update_reference_``), in-place multi-direction updates.
* :mod:`.embedding`: ``grouped_embedding`` (reference ``grouped_embedding_reference``),
  directions generated at the looked-up rows only.

Support modules: :mod:`.dispatch` (``IMPLS``, ``pick``), :mod:`.tiles` (Philox and the
direction streams as ``@triton.jit`` helpers), :mod:`._chunks` (chunked torch generation),
:mod:`._support` (Triton or its stand-in).

The entry points are also reachable from here (``zo_fx.kernels.grouped_linear``); the
modules are imported on first use, so importing ``zo_fx.kernels`` does not import Triton.
"""

from __future__ import annotations

import importlib

from .dispatch import IMPLS, check_impl, pick, triton_available

_ENTRY_POINTS = {
    "perturbed": "perturb",
    "perturbed_groups": "perturb",
    "grouped_linear": "linear",
    "grouped_linear_reference": "linear",
    "perturbed_linear": "linear",
    "blocked_grouped_matmul": "blocked",
    "grouped_embedding": "embedding",
    "grouped_embedding_reference": "embedding",
    "fused_update_": "update",
    "fused_update_reference_": "update",
    "adamezo_update_": "update",
    "adamezo_update_reference_": "update",
}


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IMPLS", "check_impl", "pick", "triton_available", *_ENTRY_POINTS]
