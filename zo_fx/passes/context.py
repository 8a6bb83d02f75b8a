"""What every rewrite rule reads and writes: layouts of the captured graph's values, and the new graph.

The rewrite walks the captured graph in order and gives every value one layout:

* ``invariant``: computed once for the B examples; it depends on no perturbed parameter.
* ``grouped``: the value the original graph would give, for every group, laid out as G
  equal slices of its one batch dimension, group-major. Chunking that dimension into G
  pieces gives each group's value: every rule that makes a grouped value keeps this true.
* ``per-group``: G separate values (:class:`zo_fx.ops.PerGroup`), one per group: a
  perturbed bias, or what an op that mixes examples returned for one group's slice.
* ``lazy``: a value that depends on trainable parameters and on no example (an adapter's
  delta weight, a transposed weight). It is emitted only when a consumer asks for it
  (:meth:`RewriteContext.per_group_value`), as a :class:`zo_fx.ops.LazyGroups` made one
  group at a time, so that a rule which folds it into its own op (a transposed weight
  into a linear) leaves nothing behind.

Trainable parameter placeholders have the layout ``parameter``: a use of one is what the
rules exist for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
from torch.fx import Graph, Node
from torch.utils import _pytree as pytree

from .. import ops
from ..kernels.perturb import SMALL_NUMEL
from .capture import CapturedModel

aten = torch.ops.aten
#: views that need their input's strides to match the original's; the same values come from a reshape
STRIDE_SENSITIVE_VIEWS = {aten.view.default, aten._unsafe_view.default}

def stride_free(target):
    """The op to run in place of ``target`` on a value laid out differently from the original's."""
    return aten.reshape.default if target in STRIDE_SENSITIVE_VIEWS else target


INV, GRP, PG, LAZY, PARAM = "invariant", "grouped", "per-group", "lazy", "parameter"


class UncoveredParameterUseError(NotImplementedError):
    """No rewrite rule covers a node that uses a perturbed value; the message lists every rule's reason."""


class UnsupportedGraphError(NotImplementedError):
    """The graph does something that no group layout can express exactly (e.g. an output that mixes groups)."""


@dataclass
class ParameterUse:
    """One use of a trainable parameter: the node, its op, the rule that handled it, and why others did not."""

    parameter: str
    node: str
    op: str
    rule: str
    refusals: list[tuple[str, str]] = field(default_factory=list)


def op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removeprefix("aten.")
    return getattr(target, "__name__", None) or str(target)


class RewriteContext:
    """The state of one rewrite: old graph, new graph, layouts, and the group-table placeholders."""

    def __init__(self, captured: CapturedModel, groups: int, kind: str, impl: str):
        self.c = captured
        self.G = groups
        self.kind = kind
        self.impl = impl
        self.g = Graph()
        self.new: dict[Node, object] = {}
        self.layout: dict[Node, str] = {}
        self.uses: list[ParameterUse] = []
        self.trainable = {ph: name for ph, name in captured.param_of_placeholder.items() if name in captured.pids}
        self.seeds: Node | None = None
        self.scales: Node | None = None
        #: the rule rewriting the current node: what a parameter use it emits is recorded under
        self.current_rule = "per-group"
        self._repeated: dict[Node, Node] = {}
        self._scaled: dict[Node, Node] = {}
        self._per_group: dict[Node, Node] = {}
        #: old node -> (rule, reason) of every rule that refused it before one matched
        self.refusals: dict[Node, list[tuple[str, str]]] = {}

    # ---- what a value is ----------------------------------------------------------------------------
    def layout_of(self, node) -> str:
        if not isinstance(node, Node):
            return INV
        return self.layout.get(node, INV)

    def is_param(self, node) -> bool:
        return isinstance(node, Node) and node.op == "placeholder" and node.name in self.trainable

    def pid(self, node) -> int | None:
        return self.c.pids[self.trainable[node.name]] if self.is_param(node) else None

    def param_tensor(self, node: Node) -> torch.Tensor:
        return self.c.params[self.trainable[node.name]]

    def has_batch(self, size) -> bool:
        if isinstance(size, torch.SymInt):
            return bool(size.node.expr.free_symbols & self.c.batch_symbols)
        return False

    def batch_dims(self, node) -> list[int]:
        """Dims of ``node``'s tensor whose size depends on the batch size."""
        val = node.meta.get("val") if isinstance(node, Node) else None
        if not isinstance(val, torch.Tensor):
            return []
        return [d for d, size in enumerate(val.shape) if self.has_batch(size)]

    def output_batch_dims(self, node: Node) -> list[list[int] | None]:
        """The batch-carrying dims of every leaf of ``node``'s output (None for a leaf that is no tensor)."""
        vals = pytree.tree_flatten(node.meta.get("val"))[0]
        return [[d for d, s in enumerate(v.shape) if self.has_batch(s)] if isinstance(v, torch.Tensor) else None
                for v in vals]

    def batch_dim(self, node) -> int | None:
        """The one batch dim of ``node``; None when it has none or several."""
        dims = self.batch_dims(node)
        return dims[0] if len(dims) == 1 else None

    def is_batch_sym(self, node) -> bool:
        return isinstance(node, Node) and self.has_batch(node.meta.get("val"))

    def carries_batch(self, node) -> bool:
        """Whether ``node`` depends on the examples: grouped, or an invariant batch tensor or size."""
        if not isinstance(node, Node):
            return False
        layout = self.layout_of(node)
        if layout == GRP:
            return True
        if layout in (INV, PG):
            return bool(self.batch_dims(node)) or self.is_batch_sym(node)
        return False

    def layouts(self, node: Node) -> set[str]:
        return {self.layout_of(a) for a in node.all_input_nodes}

    # ---- emitting -------------------------------------------------------------------------------------
    def emit(self, target, args, kwargs=None) -> Node:
        return self.g.call_function(target, tuple(args), dict(kwargs or {}))

    def set(self, node: Node, value, layout: str) -> None:
        self.new[node] = value
        self.layout[node] = layout

    def copy(self, node: Node, arg_map) -> Node:
        """``node`` copied into the new graph; a ``view`` becomes a ``reshape`` when its input may be laid
        out differently from the original's (grouped values are concatenated, slices are strided)."""
        new = self.g.node_copy(node, arg_map)
        if self.layout_of(node.args[0]) != INV:
            new.target = stride_free(new.target)
        return new

    def as_grouped(self, node):
        """The new-graph value of an invariant or grouped ``node`` in the grouped layout."""
        if not isinstance(node, Node):
            return node
        layout = self.layout_of(node)
        if layout == GRP:
            return self.new[node]
        if layout != INV:
            raise UnsupportedGraphError(f"{node.name} ({layout}) cannot be used where a grouped value is needed")
        if isinstance(node.meta.get("val"), torch.Tensor):
            bdim = self.batch_dim(node)
            if bdim is None:
                return self.new[node]
            if node not in self._repeated:
                self._repeated[node] = self.emit(ops.repeat_groups, (self.new[node], self.G, bdim))
            return self._repeated[node]
        if self.is_batch_sym(node):
            if node not in self._scaled:
                self._scaled[node] = self.emit(ops.scale_size, (self.new[node], self.G))
            return self._scaled[node]
        return self.new[node]

    def scalable(self, node) -> bool:
        """An invariant batch-dependent size that a grouped op can multiply by G (it is proportional to B)."""
        expr = node.meta["val"].node.expr
        subs = {s: self.G * s for s in self.c.batch_symbols}
        return sympy.expand(expr.subs(subs) - self.G * expr) == 0

    def per_group_value(self, node: Node, consumer: Node):
        """The new-graph value of a parameter, lazy or per-group ``node``, indexable by group."""
        layout = self.layout_of(node)
        if layout == PARAM:
            return self._param_groups(node, consumer)
        if layout == LAZY:
            if node not in self.new:
                self._emit_lazy(node)
            return self.new[node]
        if layout == PG:
            return self.new[node]
        raise AssertionError(f"{node.name} is {layout}, not per group")

    def _param_groups(self, param: Node, consumer: Node):
        """A small parameter: its G copies at once (shared by its consumers); a large one: made per group."""
        self.record(consumer, param, self.current_rule)
        tensor = self.param_tensor(param)
        args = (self.new[param], self.pid(param), self.seeds, self.scales, self.kind, self.G)
        if tensor.numel() > SMALL_NUMEL:
            return self.emit(ops.lazy_param, args)
        if param not in self._per_group:
            self._per_group[param] = self.emit(ops.per_group_params, args)
        return self._per_group[param]

    def _emit_lazy(self, node: Node) -> None:
        saved = self.current_rule
        self.current_rule = "batch-free"
        try:
            codes, args, kwargs = self.leaves(node)
            cache = len(node.users) > 1
            target = ops.op_ref(stride_free(node.target))
            self.new[node] = self.emit(ops.lazy_map, (target, self.G, codes, args, kwargs, cache))
        finally:
            self.current_rule = saved

    def leaves(self, node: Node):
        """``node``'s args with every input replaced by its new value, and one map_groups code per leaf
        (a grouped input's code is its batch dim)."""
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        codes, new_leaves = [], []
        for leaf in leaves:
            if not isinstance(leaf, Node):
                codes.append(ops.PASS)
                new_leaves.append(leaf)
                continue
            layout = self.layout_of(leaf)
            if layout in (PARAM, LAZY, PG):
                codes.append(ops.PER_GROUP)
                new_leaves.append(self.per_group_value(leaf, node))
            elif layout == GRP:
                bdim = self.batch_dim(leaf)
                if bdim is None:
                    raise AssertionError(f"grouped value {leaf.name} has no single batch dim")
                codes.append(bdim)
                new_leaves.append(self.new[leaf])
            else:
                codes.append(ops.PASS)
                new_leaves.append(self.new[leaf])
        args, kwargs = pytree.tree_unflatten(new_leaves, spec)
        return tuple(codes), tuple(args), dict(kwargs)

    # ---- report ----------------------------------------------------------------------------------------
    def record(self, node: Node, param: Node, rule: str) -> None:
        self.uses.append(
            ParameterUse(self.trainable[param.name], node.name, op_name(node.target), rule,
                         list(self.refusals.get(node, [])))
        )
