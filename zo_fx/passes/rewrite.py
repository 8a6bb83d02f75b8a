"""The perturbation rewrite: one graph that evaluates G perturbed copies of the model.

Walks the captured ATen graph in order and gives every node one of three layouts
(see :mod:`zo_fx.ops`): *invariant* (computed once for the B examples),
*grouped* (G slices of the batch dim) or *per-group* (a list of G batch-free values).

* A node that depends on no perturbed parameter stays invariant and runs once: this is
  the direction-invariance pass, and why PEFT or partially frozen models are cheap.
* A use of a trainable parameter is replaced by a rule:
  ``linear`` / ``addmm`` / ``mm`` / ``matmul`` -> :func:`ops.grouped_linear` (the weight
  is never copied per group; one transient perturbed weight at a time in the torch path,
  formed in registers in the Triton path), ``embedding`` -> :func:`ops.grouped_embedding`
  (perturbation generated at the looked-up rows only), and small parameters (norm
  weights, biases, scales) in elementwise and norm ops -> per-group copies through
  :func:`ops.map_groups`.
* Any other node with a grouped input is copied with its invariant inputs expanded to
  the grouped layout: tensors repeated along their batch dim, batch-dependent sizes
  multiplied by G. The expansion to G*B rows thus happens at the first perturbed op.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from .. import ops
from .capture import CapturedModel

aten = torch.ops.aten

INV, GRP, PG = "invariant", "grouped", "per-group"

# Ops in which a small parameter may be replaced by its per-group copies.
ELEMENTWISE_OPS = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.rsub.Tensor,
    aten.addcmul.default, aten.addcdiv.default, aten.where.self, aten.neg.default, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.exp.default, aten.tanh.default, aten.sigmoid.default, aten.mul.Scalar,
    aten.add.Scalar, aten.clamp.default, aten.abs.default, aten.sqrt.default, aten.rsqrt.default,
    aten.maximum.default, aten.minimum.default, aten.lerp.Scalar, aten.lerp.Tensor,
}
VIEW_OPS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.to.dtype, aten.to.dtype_layout,
    aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.slice.Tensor, aten.select.int, aten.index_select.default, aten.detach.default,
    aten.cat.default, aten.stack.default, aten.to.device, aten._assert_tensor_metadata.default,
}
NORM_OPS = {
    aten.layer_norm.default: "layer_norm", aten.native_layer_norm.default: "layer_norm",
    aten.group_norm.default: "group_norm", aten.rms_norm.default: "rms_norm",
}
GENERIC_RULE_OPS = ELEMENTWISE_OPS | VIEW_OPS | set(NORM_OPS)
# Ops whose result depends only on shapes/dtypes of their inputs, never on values.
DATA_FREE_OPS = {
    aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
    aten.scalar_tensor.default, aten.sym_size.int, aten._assert_tensor_metadata.default,
}

#: a parameter with at least this many elements and 2+ dims is a weight matrix: it must go
#: through a matmul or embedding rule, never be copied G times
MATRIX_MIN_NUMEL = 4096


class UncoveredParameterUseError(NotImplementedError):
    """A trainable parameter is used by an op that no rewrite rule covers."""


class UnsupportedGraphError(NotImplementedError):
    """The graph does something the grouped layout cannot express (e.g. mixes examples)."""


@dataclass
class ParameterUse:
    parameter: str
    node: str
    op: str
    rule: str


@dataclass
class Rewritten:
    graph_module: GraphModule
    uses: list[ParameterUse]
    layouts: Counter = field(default_factory=Counter)
    groups: int = 0
    #: captured node name -> layout (invariant / grouped / per-group)
    node_layouts: dict = field(default_factory=dict)


def _op_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


class _Rewriter:
    def __init__(self, captured: CapturedModel, groups: int, kind: str, impl: str, allow_fallback: bool):
        self.c = captured
        self.G = groups
        self.kind = kind
        self.impl = impl
        self.allow_fallback = allow_fallback
        self.old = captured.graph_module.graph
        self.g = Graph()
        self.new: dict[Node, Node] = {}
        self.layout: dict[Node, str] = {}
        self.repeated: dict[Node, Node] = {}
        self.scaled: dict[Node, Node] = {}
        self.uses: list[ParameterUse] = []
        self.trainable = {
            ph: name for ph, name in captured.param_of_placeholder.items() if name in captured.pids
        }

    # ---- shape helpers ------------------------------------------------------------------------------
    def _has_batch(self, size) -> bool:
        if isinstance(size, torch.SymInt):
            return bool(size.node.expr.free_symbols & self.c.batch_symbols)
        return False

    def batch_dim(self, node: Node) -> int | None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        for d, size in enumerate(val.shape):
            if self._has_batch(size):
                return d
        return None

    def _is_batch_sym(self, node: Node) -> bool:
        return self._has_batch(node.meta.get("val"))

    def _is_tensor(self, node: Node) -> bool:
        return isinstance(node.meta.get("val"), torch.Tensor)

    # ---- invariant -> grouped ---------------------------------------------------------------------
    def as_grouped(self, node: Node):
        """The new-graph value of ``node`` in the grouped layout."""
        layout = self.layout.get(node, INV)
        if layout == GRP:
            return self.new[node]
        if layout == PG:
            raise UnsupportedGraphError(f"node {node.name} holds per-group values where a batch tensor is needed")
        if self._is_tensor(node):
            bdim = self.batch_dim(node)
            if bdim is None:
                return self.new[node]
            if node not in self.repeated:
                self.repeated[node] = self.g.call_function(ops.repeat_groups, (self.new[node], self.G, bdim))
            return self.repeated[node]
        if self._is_batch_sym(node):
            expr = node.meta["val"].node.expr
            subs = {s: self.G * s for s in self.c.batch_symbols}
            if sympy.expand(expr.subs(subs) - self.G * expr) != 0:
                raise UnsupportedGraphError(
                    f"size {node.name} = {expr} is not proportional to the batch size; "
                    "the grouped layout cannot rescale it"
                )
            if node not in self.scaled:
                self.scaled[node] = self.g.call_function(ops.scale_size, (self.new[node], self.G))
            return self.scaled[node]
        return self.new[node]

    # ---- the pass ---------------------------------------------------------------------------------
    def run(self) -> Rewritten:
        self.seeds = None
        for node in self.old.nodes:
            if node.op == "placeholder":
                self.new[node] = self.g.placeholder(node.name)
                self.new[node].meta = dict(node.meta)
                self.layout[node] = INV
                continue
            if self.seeds is None:  # after the graph's own placeholders: the group table
                self.seeds = self.g.placeholder("zo_seeds")
                self.scales = self.g.placeholder("zo_scales")
            if node.op == "get_attr":
                self.new[node] = self.g.get_attr(node.target)
                self.layout[node] = INV
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                self._output(node)
            else:
                raise UnsupportedGraphError(f"unexpected node kind {node.op} ({node.name})")
        gm = GraphModule(self.c.graph_module, self.g)
        gm.graph.lint()
        layouts = {n.name: layout for n, layout in self.layout.items() if n.op == "call_function"}
        return Rewritten(gm, self.uses, Counter(layouts.values()), self.G, layouts)

    def _call(self, node: Node):
        params = [a for a in node.all_input_nodes if a.name in self.trainable and a.op == "placeholder"]
        if params:
            self._param_use(node, params)
            return
        layouts = {self.layout.get(a, INV) for a in node.all_input_nodes}
        if PG in layouts or (GRP in layouts and self._indexes_by_example(node)):
            self._map_groups(node, rule=None)
        elif GRP in layouts:
            self._grouped_copy(node)
        else:
            self.new[node] = self.g.node_copy(node, lambda a: self.new[a])
            self.layout[node] = INV

    def _indexes_by_example(self, node: Node) -> bool:
        """An advanced index whose index tensors carry the batch (``h[arange(B), last]``): its index
        values count examples, so on the repeated batch they would pick group 0's rows for every
        group. It runs once per group instead, which is exact."""
        if node.target != aten.index.Tensor:
            return False
        return any(isinstance(i, Node) and self.batch_dim(i) is not None for i in node.args[1])

    def _grouped_copy(self, node: Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and self.batch_dim(node) is None:
            if node.target in DATA_FREE_OPS:  # shape-only: same value for every group
                self.new[node] = self.g.node_copy(node, lambda a: self.new[a])
                self.layout[node] = INV
                return
            raise UnsupportedGraphError(
                f"node {node.name} ({_op_name(node.target)}) turns batch tensors into a result without a batch "
                "dimension, which would mix the perturbed groups"
            )
        self.new[node] = self.g.node_copy(node, self.as_grouped)
        self.layout[node] = GRP

    def _leaf_code(self, a: Node) -> int:
        layout = self.layout.get(a, INV)
        if layout == PG:
            return ops.PER_GROUP
        if layout == GRP:
            if self._is_tensor(a):
                return self.batch_dim(a)
            return ops.GROUPED_SYM if self._is_batch_sym(a) else ops.PASS
        return ops.PASS

    def _map_groups(self, node: Node, rule: str | None, replace: dict | None = None):
        """Call ``node``'s op once per group (per-group params, grouped inputs sliced)."""
        replace = replace or {}
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        codes, new_leaves = [], []
        for leaf in leaves:
            if isinstance(leaf, Node):
                if leaf in replace:
                    codes.append(ops.PER_GROUP)
                    new_leaves.append(replace[leaf])
                else:
                    codes.append(self._leaf_code(leaf))
                    new_leaves.append(self.new[leaf])
            else:
                codes.append(ops.PASS)
                new_leaves.append(leaf)
        args, kwargs = pytree.tree_unflatten(new_leaves, spec)
        out_vals = pytree.tree_flatten(node.meta.get("val"))[0]
        out_bdims = []
        for v in out_vals:
            bdim = None
            if isinstance(v, torch.Tensor):
                bdim = next((d for d, s in enumerate(v.shape) if self._has_batch(s)), None)
            out_bdims.append(ops.PER_GROUP if bdim is None else bdim)
        if not out_bdims:
            out_bdims = [ops.PER_GROUP]
        self.new[node] = self.g.call_function(
            ops.map_groups, (node.target, self.G, tuple(codes), tuple(out_bdims), tuple(args), dict(kwargs))
        )
        grouped = any(d != ops.PER_GROUP for d in out_bdims)
        if grouped and any(d == ops.PER_GROUP for d in out_bdims):
            raise UnsupportedGraphError(f"node {node.name} returns both batch and batch-free per-group values")
        self.layout[node] = GRP if grouped else PG

    # ---- rules for parameter uses ------------------------------------------------------------------
    def _record(self, node: Node, param_node: Node, rule: str):
        self.uses.append(ParameterUse(self.trainable[param_node.name], node.name, _op_name(node.target), rule))

    def _pid(self, node) -> int | None:
        if isinstance(node, Node) and node.name in self.trainable:
            return self.c.pids[self.trainable[node.name]]
        return None

    def _param_use(self, node: Node, params: list[Node]):
        t = node.target
        args = node.args
        if t == aten.linear.default and len(args) >= 2 and self._x_ok(args[0]) and args[0] not in params:
            self._linear(node, args[0], args[1], args[2] if len(args) > 2 else None, "out_in", "linear")
        elif (
            t == aten.addmm.default and self._x_ok(args[1]) and args[1] not in params
            and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
        ):
            self._linear(node, args[1], args[2], args[0], "in_out", "addmm")
        elif t in (aten.mm.default, aten.matmul.default) and args[1] in params and args[0] not in params \
                and self._x_ok(args[0]) and node.args[1].meta["val"].dim() == 2:
            self._linear(node, args[0], args[1], None, "in_out", "mm" if t == aten.mm.default else "matmul")
        elif t == aten.embedding.default and args[0] in params and args[1] not in params:
            self._embedding(node)
        else:
            self._generic(node, params)

    def _x_ok(self, x) -> bool:
        return isinstance(x, Node) and self.layout.get(x, INV) in (INV, GRP)

    def _linear(self, node, x, weight, bias, layout, rule):
        if self.layout.get(weight, INV) != INV:
            trainable = [p for p in (weight, bias) if isinstance(p, Node) and p.name in self.trainable]
            return self._generic(node, trainable)
        x_grouped = self.layout.get(x, INV) == GRP
        x_bdim = self.batch_dim(x) if x_grouped else ops.PASS
        if x_grouped and x_bdim is None:
            raise UnsupportedGraphError(f"input of {node.name} has no batch dimension")
        bias_node = bias if isinstance(bias, Node) else None
        if bias_node is not None and self.layout.get(bias_node, INV) != INV:
            return self._generic(node, [p for p in (weight, bias) if isinstance(p, Node) and p.name in self.trainable])
        self.new[node] = self.g.call_function(
            ops.grouped_linear,
            (
                self.new[x], self.new[weight], self.new[bias_node] if bias_node is not None else None,
                self._pid(weight), self._pid(bias_node), self.seeds, self.scales, self.kind, self.G,
                x_bdim, layout, self.impl,
            ),
        )
        self.layout[node] = GRP
        for p in (weight, bias_node):
            if p is not None and p.name in self.trainable:
                self._record(node, p, rule)

    def _embedding(self, node):
        weight, ids = node.args[0], node.args[1]
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        ids_grouped = self.layout.get(ids, INV) == GRP
        ids_bdim = self.batch_dim(ids) if ids_grouped else ops.PASS
        rows = self.g.call_function(
            ops.grouped_embedding,
            (self.new[weight], self.new[ids], self._pid(weight), self.seeds, self.scales, self.kind, self.G,
             ids_bdim, padding_idx, self.impl),
        )
        out_bdim = self.batch_dim(node)
        if out_bdim is None:
            self.new[node] = rows
            self.layout[node] = PG
        else:
            self.new[node] = self.g.call_function(ops.grouped_embedding_cat, (rows, out_bdim))
            self.layout[node] = GRP
        self._record(node, weight, "embedding")

    def _generic(self, node, params):
        rule = NORM_OPS.get(node.target) or ("elementwise" if node.target in ELEMENTWISE_OPS else "view")
        for p in params:
            name = self.trainable[p.name]
            tensor = self.c.params[name]
            if node.target not in GENERIC_RULE_OPS and not self.allow_fallback:
                raise UncoveredParameterUseError(
                    f"no rewrite rule covers parameter {name!r} in node {node.name!r} (op {_op_name(node.target)}). "
                    "Covered: linear, addmm, mm/matmul (parameter as right operand), embedding, norms and "
                    "elementwise ops. Freeze the parameter (requires_grad=False), or pass "
                    "allow_fallback=True to evaluate this op once per group with perturbed copies."
                )
            if tensor.dim() >= 2 and tensor.numel() >= MATRIX_MIN_NUMEL and not self.allow_fallback:
                raise UncoveredParameterUseError(
                    f"weight matrix {name!r} is used by node {node.name!r} (op {_op_name(node.target)}), which no "
                    "matmul or embedding rule covers; the generic rule would copy it once per group. Use it "
                    "through F.linear / matmul with the weight as right operand, or pass allow_fallback=True."
                )
        replace = {
            p: self.g.call_function(
                ops.per_group_params, (self.new[p], self._pid(p), self.seeds, self.scales, self.kind, self.G)
            )
            for p in params
        }
        self._map_groups(node, rule, replace)
        for p in params:
            self._record(node, p, rule if node.target in GENERIC_RULE_OPS else "fallback")

    def _output(self, node: Node):
        outs = []
        for a in pytree.tree_flatten(node.args)[0]:
            if not isinstance(a, Node):
                outs.append(a)
            elif self.layout.get(a, INV) == PG:
                raise UnsupportedGraphError(
                    f"model output {a.name} has no batch dimension but depends on a perturbation"
                )
            else:
                outs.append(self.as_grouped(a))
        self.g.output(tuple(outs))


def rewrite(
    captured: CapturedModel, groups: int, kind: str, impl: str = "auto", allow_fallback: bool = False
) -> Rewritten:
    """Rewrite ``captured`` to evaluate ``groups`` perturbed copies in one pass."""
    return _Rewriter(captured, groups, kind, impl, allow_fallback).run()
