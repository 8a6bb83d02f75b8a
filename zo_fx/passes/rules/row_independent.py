"""Ops that keep examples apart run once on all G*B rows of the grouped layout.

An op may be copied onto the grouped layout only when row i of its output depends on row
i of its inputs alone, along the one batch dim, and its output keeps the batch in one dim
that still splits into G group-major slices. This module holds that knowledge op by op:
pointwise ops (torch's ``pointwise`` tag) with aligned batch dims, views and reshapes that
keep the batch as the leading factor of its dim, reductions and scans over other dims,
norms over trailing dims, matmuls whose batch dim is not contracted, attention, and the
frozen embedding / convolution / pooling ops. An op it does not know, or knows but with
its batch dim in the wrong place, is refused here and runs once per group instead
(:mod:`.per_group`), which is exact for any op: knowledge here only buys speed.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..context import GRP, INV, RewriteContext
from . import Refusal, rule
from .per_group import is_random

aten = torch.ops.aten

#: ops (no pointwise tag) that act on every element alone or only read shapes
ELEMENTWISE = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.clamp.default, aten.clamp.Tensor, aten.dropout.default,
    aten.view_as_real.default, aten.view_as_complex.default, aten.real.default, aten.imag.default,
}
#: views whose output dims follow from the input's (the batch dim moves, the values do not mix)
MOVES = {
    aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.movedim.int,
}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
#: op -> (index of the dim argument, its default): the op works along that dim only
ALONG_DIM = {
    aten.select.int: (1, None), aten.slice.Tensor: (1, 0), aten.narrow.default: (1, None),
    aten.split.Tensor: (2, 0), aten.split_with_sizes.default: (2, 0), aten.unbind.int: (1, 0),
    aten.chunk.default: (2, 0), aten.index_select.default: (1, None), aten.cumsum.default: (1, None),
    aten.cumprod.default: (1, None), aten._softmax.default: (1, None), aten.softmax.int: (1, None),
    aten._log_softmax.default: (1, None), aten.log_softmax.int: (1, None), aten.topk.default: (2, -1),
    aten.sort.default: (1, -1), aten.sort.stable: (2, -1), aten.argsort.default: (1, -1),
    aten.argsort.stable: (2, -1), aten.gather.default: (1, None), aten.roll.default: (2, None),
    aten.flip.default: (1, None), aten.cat.default: (1, 0), aten.stack.default: (1, 0),
    aten.repeat_interleave.self_int: (2, None), aten._safe_softmax.default: (1, None),
    aten.glu.default: (1, -1), aten.diff.default: (2, -1),
}
#: reductions: op -> index of the dims argument (a missing or empty one reduces everything)
REDUCTIONS = {
    aten.sum.dim_IntList: 1, aten.mean.dim: 1, aten.amax.default: 1, aten.amin.default: 1, aten.max.dim: 1,
    aten.min.dim: 1, aten.argmax.default: 1, aten.argmin.default: 1, aten.any.dim: 1, aten.any.dims: 1,
    aten.all.dim: 1, aten.var.correction: 1, aten.std.correction: 1, aten.var_mean.correction: 1,
    aten.prod.dim_int: 1, aten.logsumexp.default: 1, aten.linalg_vector_norm.default: 2,
    aten.norm.ScalarOpt_dim: 2, aten.count_nonzero.dim_IntList: 1,
}
#: normalise over the trailing ``len(normalized_shape)`` dims (arg 1)
TRAILING_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
#: ops over [N, C, ...] inputs that treat every sample alone (inference batch norm, convolutions, pooling)
PER_SAMPLE_DIM0 = {
    aten.group_norm.default, aten.native_group_norm.default, aten._native_batch_norm_legit_no_training.default,
    aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.max_pool2d.default,
    aten.max_pool2d_with_indices.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default,
    aten.max_pool1d.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
    aten.pixel_shuffle.default, aten.im2col.default,
}
MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default,
           aten.baddbmm.default}
ATTENTION = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default}


def _norm(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _arg(node: Node, i: int, default):
    return node.args[i] if len(node.args) > i else default


def _tensor_inputs(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _batch_inputs(node: Node, ctx: RewriteContext) -> list[Node]:
    return [a for a in _tensor_inputs(node) if ctx.batch_dims(a)]


def _single_bdims(node: Node, ctx: RewriteContext) -> str | None:
    for a in _batch_inputs(node, ctx):
        if ctx.batch_dim(a) is None:
            return f"input {a.name} carries the batch in dims {ctx.batch_dims(a)}"
    return None


def _out_bdims_ok(node: Node, ctx: RewriteContext) -> str | None:
    for dims in ctx.output_batch_dims(node):
        if dims is not None and len(dims) != 1:
            return f"an output carries the batch in dims {dims}"
    return None


def _pointwise(node: Node, ctx: RewriteContext) -> str | None:
    """Broadcast inputs: every batch-carrying input's batch dim lines up with the output's, at full size."""
    out = node.meta["val"]
    out_bdim = ctx.batch_dim(node)
    for a in _batch_inputs(node, ctx):
        val = a.meta["val"]
        aligned = ctx.batch_dim(a) + out.dim() - val.dim()
        if aligned != out_bdim:
            return f"input {a.name}'s batch dim does not line up with the output's"
    return None


def _along(node: Node, ctx: RewriteContext) -> str | None:
    index, default = ALONG_DIM[node.target]
    dim = node.kwargs.get("dim", _arg(node, index, default))
    first = node.args[0]
    if node.target in (aten.cat.default, aten.stack.default):
        tensors = [t for t in first if isinstance(t, Node)]
        rank = tensors[0].meta["val"].dim() + (1 if node.target == aten.stack.default else 0)
        bdims = {ctx.batch_dim(t) for t in tensors}
        if bdims != {ctx.batch_dim(tensors[0])} or None in bdims:
            return "the tensors carry the batch in different dims"
        return "it joins along the batch dim" if _norm(dim, rank) == ctx.batch_dim(tensors[0]) else None
    if dim is None:
        return "it works on the flattened tensor"
    bdim = ctx.batch_dim(first)
    if bdim is None:
        # the input has no batch (e.g. a table indexed by a grouped index): the index must be the batch carrier
        if node.target == aten.index_select.default:
            return "the index carries the batch"
        return None
    rank = first.meta["val"].dim()
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if bdim in [_norm(d, rank) for d in dims]:
        if node.target == aten.slice.Tensor and _full_slice(node, first, bdim):
            return None
        return f"it works along the batch dim {bdim}"
    if node.target == aten.gather.default and ctx.batch_dim(node.args[2]) != bdim:
        return "the gather index does not carry the batch in the input's batch dim"
    if node.target == aten.index_select.default and ctx.batch_dims(node.args[2]):
        return "the index carries the batch"
    return None


def same_size(a, b) -> bool:
    """Equal as expressions, not merely at the example's sizes (a symbolic size compared by value would
    take the example's hint: T - 5 could equal B there)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr
    return a == b


def _full_slice(node: Node, first: Node, bdim: int) -> bool:
    """``x[:, ...]`` spelled as a slice over the whole batch dim."""
    return same_size(node.meta["val"].shape[bdim], first.meta["val"].shape[bdim])


def _reduction(node: Node, ctx: RewriteContext) -> str | None:
    dims = node.kwargs.get("dim", _arg(node, REDUCTIONS[node.target], None))
    first = node.args[0]
    rank = first.meta["val"].dim()
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return "it reduces over every dim, the batch included"
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if ctx.batch_dim(first) in [_norm(d, rank) for d in dims]:
        return "it reduces over the batch dim"
    return None


def _reshape(node: Node, ctx: RewriteContext) -> str | None:
    """The dims before the batch dim stay as they are, so the batch stays the leading factor of its dim."""
    src = node.args[0]
    in_shape, out_shape = src.meta["val"].shape, node.meta["val"].shape
    in_b, out_b = ctx.batch_dim(src), ctx.batch_dim(node)
    if out_b is None:
        return "the output has no single batch dim"
    if in_b != out_b or not all(same_size(a, b) for a, b in zip(in_shape[:in_b], out_shape[:out_b])):
        return "it moves dims ahead of the batch, so groups would interleave"
    return None  # its sizes must also scale with the batch: checked for every op in match()


def _matmul(node: Node, ctx: RewriteContext) -> str | None:
    t = node.target
    a, b = (node.args[1], node.args[2]) if t in (aten.addmm.default, aten.baddbmm.default) else node.args[:2]
    if t == aten.addmm.default and ctx.batch_dims(node.args[0]):
        return "the added matrix carries the batch"
    a_val, b_val = a.meta["val"], b.meta["val"]
    a_b, b_b = ctx.batch_dim(a), ctx.batch_dim(b) if isinstance(b, Node) else None
    if t == aten.linear.default:
        if ctx.batch_dims(b) or (len(node.args) > 2 and ctx.batch_dims(node.args[2])):
            return "the weight carries the batch"
        return "the batch dim is contracted" if a_b == a_val.dim() - 1 else None
    if b_b is None and not ctx.batch_dims(b):  # a shared right operand
        return "the batch dim is contracted" if a_b == a_val.dim() - 1 else None
    if a_b is None and not ctx.batch_dims(a):  # a shared left operand: batch among b's columns or leading dims
        return "the batch dim is contracted" if b_b == b_val.dim() - 2 else None
    # both carry the batch: it must be the same leading (broadcast) dim of both
    if a_b >= a_val.dim() - 2 or b_b >= b_val.dim() - 2:
        return "both operands carry the batch and one carries it in a matrix dim"
    if a_val.dim() - a_b != b_val.dim() - b_b:
        return "the operands' batch dims do not line up"
    return None


def _attention(node: Node, ctx: RewriteContext) -> str | None:
    q = node.args[0]
    q_b = ctx.batch_dim(q)
    if q_b is None or q_b >= q.meta["val"].dim() - 2:
        return "the queries carry the batch in a matrix dim"
    for a in _batch_inputs(node, ctx):
        if a.meta["val"].dim() - ctx.batch_dim(a) != q.meta["val"].dim() - q_b:
            return f"input {a.name}'s batch dim does not line up with the queries'"
    return None


def _index(node: Node, ctx: RewriteContext) -> str | None:
    src, indices = node.args[0], node.args[1]
    for i in indices:
        if isinstance(i, Node) and ctx.batch_dims(i):
            return f"index {i.name} carries the batch: its values count examples"
    bdim = ctx.batch_dim(src)
    if bdim is None:
        return "the indexed tensor has no single batch dim"
    if bdim < len(indices) and indices[bdim] is not None:
        return "it indexes the batch dim"
    return None


def why_not(node: Node, ctx: RewriteContext) -> str | None:
    """Why ``node`` cannot run once on the grouped rows, or None when it can."""
    t = node.target
    if t == operator.getitem:
        return None
    if not isinstance(t, torch._ops.OpOverload):
        return f"{t} is not an ATen op this rule knows"
    reason = _single_bdims(node, ctx) or _out_bdims_ok(node, ctx)
    if reason:
        return reason
    if torch.Tag.pointwise in t.tags or t in ELEMENTWISE:
        return _pointwise(node, ctx)
    if t in MOVES:
        return None
    if t in RESHAPES:
        return _reshape(node, ctx)
    if t in ALONG_DIM:
        return _along(node, ctx)
    if t in REDUCTIONS:
        return _reduction(node, ctx)
    if t in TRAILING_NORMS:
        first = node.args[0]
        return "it normalises over the batch dim" if ctx.batch_dim(first) >= first.meta["val"].dim() - len(
            node.args[1]) else None
    if t in PER_SAMPLE_DIM0:
        return None if ctx.batch_dim(node.args[0]) == 0 and all(
            ctx.batch_dim(a) in (None, 0) for a in _batch_inputs(node, ctx)) and not any(
            ctx.batch_dims(a) for a in node.all_input_nodes[1:]) else "its input's batch is not dim 0"
    if t in MATMULS:
        return _matmul(node, ctx)
    if t in ATTENTION:
        return _attention(node, ctx)
    if t == aten.index.Tensor:
        return _index(node, ctx)
    if t == aten.embedding.default:
        return None if not ctx.batch_dims(node.args[0]) else "the table carries the batch"
    if t == aten.constant_pad_nd.default:
        first = node.args[0]
        padded = {first.meta["val"].dim() - 1 - i for i in range(len(node.args[1]) // 2)}
        return "it pads the batch dim" if ctx.batch_dim(first) in padded else None
    return f"{op_label(t)} is not known to keep examples apart"


def op_label(t) -> str:
    return str(t).removeprefix("aten.")


@rule("row-independent", order=30)
def match(node: Node, ctx: RewriteContext):
    layouts = ctx.layouts(node)
    if not layouts <= {INV, GRP}:
        return Refusal("an input is per group: " + ", ".join(sorted(layouts - {INV, GRP})))
    if any(ctx.is_param(a) for a in node.all_input_nodes):
        return Refusal("it reads a trainable parameter")
    if is_random(node):
        return Refusal("it draws random numbers")
    reason = why_not(node, ctx)
    if reason:
        return Refusal(reason)
    for a in node.all_input_nodes:
        if ctx.layout_of(a) == INV and ctx.is_batch_sym(a) and not ctx.scalable(a):
            return Refusal(f"size {a.name} is not proportional to the batch size")

    def apply():
        ctx.set(node, ctx.copy(node, ctx.as_grouped), GRP)

    return apply
