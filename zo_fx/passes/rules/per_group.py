"""Anything else that sees examples runs once per group, on that group's slice with that group's values.

Group g's slice of every grouped input is exactly the batch the original graph would
see for group g, so running the op on it is exact for any deterministic, pure op: an op
that mixes examples (mixture-of-experts routing with ``histc``, ``sort`` or ``index_add``
over tokens, an index by example), an op on a parameter no faster rule covers (a
convolution with a trainable kernel, a weight used through a slice), or an op this
package knows nothing about. The results are concatenated back into the grouped layout
when every output has one batch dim, and kept per group otherwise.

Refused: ops that draw random numbers (each group would see different noise) and ops
that write into their inputs (a write into a value the groups share).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ... import ops
from ..context import GRP, PG, RewriteContext, stride_free
from . import Refusal, rule

aten = torch.ops.aten


#: dropout ops and the index of their ``train`` argument: in eval mode they are the identity
DROPOUTS = {aten.dropout.default: 2, aten.native_dropout.default: 2, aten.feature_dropout.default: 2,
            aten.alpha_dropout.default: 2, aten.feature_alpha_dropout.default: 2}


#: recurrent ops: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
RNNS = {aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input}


def is_random(node: Node) -> bool:
    """Whether ``node`` draws random numbers (dropout in eval mode or with p = 0 does not)."""
    t = node.target
    if t in DROPOUTS:
        train = node.args[DROPOUTS[t]] if len(node.args) > DROPOUTS[t] else node.kwargs.get("train", True)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        return bool(train) and p != 0
    if t in RNNS:  # random only through dropout between layers while training
        dropout, train = node.args[5], node.args[6]
        return bool(train) and dropout != 0
    if t == aten.scaled_dot_product_attention.default:  # random only through its dropout
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return p != 0
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags


def impure_reason(node: Node) -> str | None:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if is_random(node):
            return "it draws random numbers: every group would see different noise"
        if t._schema.is_mutable:
            return "it writes into its input in place, a value the groups may share"
    return None


def output_bdims(node: Node, ctx: RewriteContext) -> list[int]:
    """The batch dim of every output leaf, ``PER_GROUP`` where one has none or several (or is no tensor)."""
    bdims = [d[0] if d and len(d) == 1 else ops.PER_GROUP for d in ctx.output_batch_dims(node)]
    return bdims or [ops.PER_GROUP]


@rule("per-group", order=50)
def match(node: Node, ctx: RewriteContext):
    reason = impure_reason(node)
    if reason:
        return Refusal(reason)

    def apply():
        codes, args, kwargs = ctx.leaves(node)
        bdims = output_bdims(node, ctx)
        target = ops.op_ref(stride_free(node.target))
        value = ctx.emit(ops.map_groups, (target, ctx.G, codes, tuple(bdims), args, kwargs))
        ctx.set(node, value, PG if ops.PER_GROUP in bdims else GRP)

    return apply
