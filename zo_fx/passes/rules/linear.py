"""A trainable weight in ``linear`` / ``addmm`` / ``mm`` / ``matmul``: one shared GEMM plus each group's term.

The weight may reach the product through view-like ops (Falcon's ``W.T`` before a
matmul, a reshape, an alias or a no-op cast): they are folded into the op's weight
layout instead of being evaluated per group. A transpose swaps the layout (``out_in``
<-> ``in_out``); a reshape keeps the parameter's element order, so the direction of
element k is still element k of the parameter's stream.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ... import ops
from ..context import GRP, INV, PARAM, RewriteContext
from . import Refusal, rule

aten = torch.ops.aten

#: views that keep the element order of a contiguous tensor
ORDER_KEEPING = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
    aten.detach.default, aten.clone.default, aten.lift_fresh_copy.default, aten.contiguous.default,
}
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


def fold_weight(operand, ctx: RewriteContext) -> tuple[Node, tuple | None, bool] | Refusal:
    """``(parameter, shape it is viewed as or None, transposed)`` for a weight operand, or why not."""
    chain = []
    node = operand
    while isinstance(node, Node) and not ctx.is_param(node):
        if node.op != "call_function" or not node.args:
            return Refusal(f"weight operand {operand.name} is not a trainable parameter or a view of one")
        chain.append(node)
        node = node.args[0]
    if not ctx.is_param(node):
        return Refusal("the weight operand is not a trainable parameter")
    param = ctx.param_tensor(node)
    if not param.is_contiguous():
        return Refusal(f"parameter {ctx.trainable[node.name]} is not contiguous")
    shape, transposed = tuple(param.shape), False
    for view in reversed(chain):  # from the parameter outwards
        val = view.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return Refusal(f"{view.name} is not a tensor")
        if view.target in TRANSPOSES and len(shape) == 2 and val.dim() == 2:
            if view.target == aten.permute.default and [d % 2 for d in view.args[1]] != [1, 0]:
                return Refusal(f"{view.name} permutes a 2-D weight into itself")
            if view.target == aten.transpose.int and {d % 2 for d in view.args[1:3]} != {0, 1}:
                return Refusal(f"{view.name} transposes a dim with itself")
            transposed = not transposed
        elif view.target in ORDER_KEEPING and not transposed:
            if any(not isinstance(s, int) for s in val.shape):
                return Refusal(f"{view.name} gives the weight a symbolic shape")
            shape = tuple(val.shape)
        elif view.target in CASTS and val.dtype == param.dtype and val.device == param.device \
                and view.kwargs.get("memory_format") in (None, torch.preserve_format):
            pass  # a cast to the dtype it has: nothing happens
        else:
            return Refusal(f"{view.name} ({view.target}) between the parameter and the product is not a "
                           "transpose, an order-keeping reshape or a no-op cast")
    if len(shape) != 2:
        return Refusal(f"the weight reaches the product with {len(shape)} dims, not 2")
    return node, (shape if shape != tuple(param.shape) else None), transposed


def _operands(node: Node):
    """``(x, weight operand, bias, layout)`` of a matmul-like node, or a Refusal."""
    t, args = node.target, node.args
    if t == aten.linear.default:
        return args[0], args[1], args[2] if len(args) > 2 else None, "out_in"
    if t == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return Refusal("addmm with alpha or beta other than 1")
        return args[1], args[2], args[0], "in_out"
    if t in (aten.mm.default, aten.matmul.default):
        return args[0], args[1], None, "in_out"
    return Refusal("not a linear, addmm, mm or matmul")


@rule("linear", order=10)
def match(node: Node, ctx: RewriteContext):
    found = _operands(node)
    if isinstance(found, Refusal):
        return found
    x, w_operand, bias, layout = found
    folded = fold_weight(w_operand, ctx)
    if isinstance(folded, Refusal):
        return folded
    weight, shape, transposed = folded
    if transposed:
        layout = "in_out" if layout == "out_in" else "out_in"
    if bias is not None and not (ctx.is_param(bias) or ctx.layout_of(bias) == INV):
        return Refusal(f"bias {bias.name} is {ctx.layout_of(bias)}, neither a parameter nor invariant")
    if isinstance(bias, Node) and ctx.batch_dims(bias):
        return Refusal(f"bias {bias.name} carries the batch")
    if not isinstance(x, Node) or ctx.layout_of(x) not in (INV, GRP) or ctx.is_param(x):
        return Refusal(f"input {getattr(x, 'name', x)} is {ctx.layout_of(x)}, not a batch tensor")
    x_val = x.meta.get("val")
    bdim = ctx.batch_dim(x)
    if bdim is None:
        return Refusal(f"input {x.name} has no single batch dim (batch dims {ctx.batch_dims(x)})")
    if bdim == x_val.dim() - 1:
        return Refusal(f"input {x.name}'s batch dim is the contracted one")
    if ctx.layout_of(x) == INV and bdim != 0:
        return Refusal(f"shared input {x.name} has its batch in dim {bdim}, not 0")
    if x_val.dim() < 2 and node.target != aten.linear.default:
        return Refusal(f"input {x.name} is 1-D")

    def apply():
        grouped = ctx.layout_of(x) == GRP
        b = bias if isinstance(bias, Node) else None
        ctx.set(node, ctx.emit(ops.grouped_linear, (
            ctx.new[x], ctx.new[weight], ctx.new[b] if b is not None else None, ctx.pid(weight), ctx.pid(b),
            ctx.seeds, ctx.scales, ctx.kind, ctx.G, bdim if grouped else ops.PASS, layout, ctx.impl, shape,
        )), GRP)
        ctx.record(node, weight, "linear" if w_operand is weight else "linear (folded views)")
        if b is not None and ctx.layout_of(b) == PARAM:
            ctx.record(node, b, "linear")

    return apply
