"""The rewrite rules, one module each, tried in order for every node of the captured graph.

A rule is a function ``match(node, ctx)`` registered with :func:`rule`. It returns
either a :class:`Refusal` (why it does not apply to this node) or a callable that, when
called, emits the node's replacement into ``ctx.g`` and sets its layout. The first rule
that does not refuse rewrites the node; the refusals before it are kept for the report.
When every rule refuses, the error lists each rule's reason for that node.

Rules, cheapest first:

* ``invariant``: nothing perturbed reaches the node: copied, run once for the B examples.
* ``linear``: a trainable weight (through transposes and reshapes) in linear / addmm /
  mm / matmul: the shared GEMM and the per-group perturbation, never a weight per group.
* ``embedding``: a trainable table looked up by ids: perturbation at the looked-up rows.
* ``row-independent``: an op whose output row i depends only on input row i (pointwise,
  views, reductions over other dims, attention, frozen GEMMs): run once on G*B rows.
* ``batch-free``: parameters and constants only, no example: evaluated per group on
  demand, any op (a kron, a matmul of two adapter factors, an FFT, an index_put).
* ``per-group``: anything else that sees examples: run once per group on that group's
  slice, with that group's parameters. Exact for any op that is deterministic and pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """Why a rule does not apply to a node."""

    reason: str


Apply = Callable[[], None]
Match = Callable[..., "Apply | Refusal"]

#: (name, match), in the order they are tried
RULES: list[tuple[str, Match]] = []
_ORDER: dict[str, int] = {}


def rule(name: str, order: int):
    """Register ``match`` under ``name``; rules are tried by increasing ``order``."""

    def register(match: Match) -> Match:
        if name in _ORDER:
            raise ValueError(f"rewrite rule {name!r} is registered twice")
        _ORDER[name] = order
        RULES.append((name, match))
        RULES.sort(key=lambda r: _ORDER[r[0]])
        return match

    return register


from . import batch_free, embedding, invariant, linear, per_group, row_independent  # noqa: E402, F401
