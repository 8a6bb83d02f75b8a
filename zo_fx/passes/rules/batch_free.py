"""A value made of parameters and constants alone, no example: evaluated per group, on demand, with any op.

LoHa's ``(A1 @ B1) * (A2 @ B2)``, LoKr's ``kron``, IA3's ``flatten``, FourierFT's
``index_put`` of a spectrum then an inverse FFT, DoRA's ``B(A(I))`` and the norm of the
adapted weight: every such node depends on the perturbation but on no example, so group
g's value is the node's op on group g's parameters. The rule emits nothing at first
(layout ``lazy``); a consumer that needs the value per group emits it as a
:class:`zo_fx.ops.LazyGroups`, and a consumer that folds it (a transposed weight in a
linear) never does. Made one group at a time, a derived weight-sized value exists once,
not G times.
"""

from __future__ import annotations

from torch.fx import Node

from ..context import INV, LAZY, PARAM, PG, RewriteContext
from . import Refusal, rule
from .per_group import impure_reason


@rule("batch-free", order=40)
def match(node: Node, ctx: RewriteContext):
    carriers = [a.name for a in node.all_input_nodes if ctx.carries_batch(a)]
    if carriers:
        return Refusal(f"it reads examples ({', '.join(carriers)})")
    layouts = ctx.layouts(node)
    if not layouts & {PARAM, LAZY}:
        return Refusal("no parameter reaches it without examples")
    if not layouts <= {INV, PARAM, LAZY, PG}:
        return Refusal(f"inputs of layouts {sorted(layouts)}")
    reason = impure_reason(node)
    if reason:
        return Refusal(reason)

    def apply():
        ctx.layout[node] = LAZY  # emitted when a consumer asks for it (RewriteContext.per_group_value)

    return apply
