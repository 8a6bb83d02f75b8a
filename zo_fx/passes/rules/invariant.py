"""A node that no perturbed value reaches is copied as it is and runs once for the B examples.

This is the direction-invariance rule: the frozen prefix of a PEFT or partially frozen
model, the attention masks and position tables built from the inputs, all run once.
Two ops get special care: the size of a grouped tensor's batch dim is read back as one
group's size (so an ``arange(B)`` counts the examples, not G*B rows), and ops that only
read their input's dtype and device (``new_zeros``) stay invariant whatever the input.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ... import ops
from ..context import GRP, INV, RewriteContext
from . import Refusal, rule

aten = torch.ops.aten

#: ops whose result depends only on their input's dtype/device and the sizes they are given
SHAPE_ONLY_OPS = {aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default}
#: checks on metadata that the grouped layout changes on purpose (a batch size of G*B)
METADATA_CHECKS = {aten._assert_tensor_metadata.default}


@rule("invariant", order=0)
def match(node: Node, ctx: RewriteContext):
    layouts = ctx.layouts(node)
    if layouts <= {INV}:
        return lambda: ctx.set(node, ctx.copy(node, lambda a: ctx.new[a]), INV)
    if node.target in METADATA_CHECKS:
        return lambda: ctx.set(node, None, INV)  # dropped: it returns nothing and checks the original sizes
    if node.target in SHAPE_ONLY_OPS and all(ctx.layout_of(a) == INV for a in node.all_input_nodes[1:]):
        src = node.args[0]
        if ctx.layout_of(src) == GRP:
            return lambda: ctx.set(node, ctx.copy(node, lambda a: ctx.new[a]), INV)
    if node.target == aten.sym_size.int and ctx.layout_of(node.args[0]) == GRP:
        return lambda: _group_size(node, ctx)
    return Refusal("a perturbed value reaches it: " + ", ".join(
        f"{a.name} ({ctx.layout_of(a)})" for a in node.all_input_nodes if ctx.layout_of(a) != INV))


def _group_size(node: Node, ctx: RewriteContext) -> None:
    size = ctx.copy(node, lambda a: ctx.new[a])
    if ctx.is_batch_sym(node):
        size = ctx.emit(ops.group_size, (size, ctx.G))
    ctx.set(node, size, INV)
