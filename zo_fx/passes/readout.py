"""Loss/readout pruning: stop the graph before the output head and fuse the head into the loss.

The last op of a language model, ``logits = h @ W_head^T``, is the largest activation
of the whole pass (G*B*T rows of vocabulary size). Materialising it for all G groups
at once and only then computing a per-example loss costs G times the memory of one
group for nothing. This pass cuts the captured graph at the head's input ``h``; the
runtime then computes each group's logits and loss in turn (peak: one group's logits).

A loss can go further by declaring what it reads: with ``readout_positions(batch)``
and ``readout_token_ids`` (prompt-based classification reads one position and a
handful of label words) only those rows of ``h`` and of ``W_head`` are used, and the
perturbation of ``W_head`` is generated at those rows only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch.fx import Node

from .capture import CapturedModel

aten = torch.ops.aten
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


@dataclass
class Head:
    """The output head cut off the graph: ``logits = x @ W^T + b`` (layout ``out_in``) or ``x @ W + b``."""

    weight: str  # canonical parameter name
    bias: str | None
    layout: str
    out_dtype: torch.dtype | None  # a cast applied to the logits, if any


def _param_name(captured: CapturedModel, node) -> str | None:
    if isinstance(node, Node) and node.op == "placeholder":
        return captured.param_of_placeholder.get(node.name)
    return None


def _is_batch(size, batch_symbols) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & batch_symbols)


def find_head(captured: CapturedModel) -> tuple[Node, Node, Head] | None:
    """The head node, its input node, and its description; None if the output is not a linear head."""
    graph = captured.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)) or len(outs) != 1 or not isinstance(outs[0], Node):
        return None
    node = outs[0]
    out_dtype = None
    if node.target in CASTS and len(node.users) == 1:
        out_dtype = node.meta["val"].dtype
        node = node.args[0]
    if not isinstance(node, Node) or len(node.users) != 1:
        return None
    if node.target == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        layout = "out_in"
    elif node.target == aten.addmm.default and not node.kwargs:
        b, x, w = node.args[0], node.args[1], node.args[2]
        layout = "in_out"
    else:
        return None
    weight = _param_name(captured, w)
    bias = _param_name(captured, b) if b is not None else None
    if weight is None or (b is not None and bias is None):
        return None
    val = x.meta.get("val") if isinstance(x, Node) else None
    if val is None or val.dim() < 2 or not _is_batch(val.shape[0], captured.batch_symbols):
        return None  # the runtime splits the head's input into groups along dim 0
    return node, x, Head(weight, bias, layout, out_dtype)


def cut_head(captured: CapturedModel) -> tuple[CapturedModel, Head] | None:
    """A copy of ``captured`` whose graph returns the head's input instead of the logits."""
    found = find_head(captured)
    if found is None:
        return None
    head_node, x, head = found
    gm = copy.deepcopy(captured.graph_module)
    graph = gm.graph
    names = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((names[x.name],),)
    graph.eliminate_dead_code()
    gm.recompile()
    return replace(captured, graph_module=gm), head
