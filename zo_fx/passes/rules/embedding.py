"""A trainable table looked up by ids: the base rows gathered, each group's direction made at those rows only."""

from __future__ import annotations

import torch
from torch.fx import Node

from ... import ops
from ..context import GRP, INV, PG, RewriteContext
from . import Refusal, rule

aten = torch.ops.aten


@rule("embedding", order=20)
def match(node: Node, ctx: RewriteContext):
    if node.target != aten.embedding.default:
        return Refusal("not an embedding")
    weight, ids = node.args[0], node.args[1]
    if not ctx.is_param(weight):
        return Refusal("the table is not a trainable parameter")
    if ctx.layout_of(ids) not in (INV, GRP) or ctx.is_param(ids):
        return Refusal(f"ids {ids.name} are {ctx.layout_of(ids)}")
    grouped = ctx.layout_of(ids) == GRP
    ids_bdim = ctx.batch_dim(ids) if grouped else ops.PASS
    if grouped and ids_bdim is None:
        return Refusal(f"grouped ids {ids.name} have no single batch dim")
    out_bdim = ctx.batch_dim(node)
    if ctx.batch_dims(node) and out_bdim is None:
        return Refusal("the rows carry the batch in several dims")
    if not grouped and ctx.batch_dims(ids) and out_bdim != 0:
        return Refusal("shared ids carry the batch in a dim other than 0")
    padding_idx = node.args[2] if len(node.args) > 2 else -1

    def apply():
        rows = ctx.emit(ops.grouped_embedding, (
            ctx.new[weight], ctx.new[ids], ctx.pid(weight), ctx.seeds, ctx.scales, ctx.kind, ctx.G, ids_bdim,
            padding_idx, ctx.impl,
        ))
        if out_bdim is None:
            ctx.set(node, rows, PG)
        else:
            ctx.set(node, ctx.emit(ops.grouped_embedding_cat, (rows, out_bdim)), GRP)
        ctx.record(node, weight, "embedding")

    return apply
