"""The perturbation rewrite: one graph that evaluates G perturbed copies of the model.

Walks the captured ATen graph in order and hands every node to the rules of
:mod:`zo_fx.passes.rules`, which decide from what the node depends on (the layouts of
its inputs, see :mod:`zo_fx.passes.context`), not from a list of allowed ops, how it
runs: once for the B examples, once on the G*B grouped rows, per group on demand, or
once per group on that group's slice. The first rule that accepts a node rewrites it.

The pass requires a functional graph with every batch tensor the model takes as a
placeholder (:mod:`zo_fx.passes.capture` ensures both). It ensures, and checks after
rewriting:

* every trainable parameter placeholder feeds only perturbation-aware ops (a shared
  GEMM with the group's term, a lookup, per-group copies): no parameter is read as if
  it were not perturbed;
* every output is in the grouped layout;
* the graph lints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .. import ops
from .capture import CapturedModel
from .context import (
    GRP,
    INV,
    LAZY,
    PARAM,
    PG,
    ParameterUse,
    RewriteContext,
    UncoveredParameterUseError,
    UnsupportedGraphError,
    op_name,
)
from .rules import RULES, Refusal

__all__ = ["rewrite", "Rewritten", "UncoveredParameterUseError", "UnsupportedGraphError", "ParameterUse",
           "INV", "GRP", "PG", "LAZY", "PERTURBATION_AWARE"]

#: the ops of the rewritten graph that may read a trainable parameter placeholder
PERTURBATION_AWARE = {ops.grouped_linear, ops.grouped_embedding, ops.per_group_params, ops.lazy_param}


@dataclass
class Rewritten:
    graph_module: GraphModule
    uses: list[ParameterUse]
    layouts: Counter = field(default_factory=Counter)
    groups: int = 0
    #: captured node name -> layout (invariant / grouped / per-group / lazy)
    node_layouts: dict = field(default_factory=dict)
    #: captured node name -> rule that rewrote it
    node_rules: dict = field(default_factory=dict)


def _rewrite_node(node: Node, ctx: RewriteContext) -> str:
    refusals: list[tuple[str, str]] = []
    for name, match in RULES:
        found = match(node, ctx)
        if isinstance(found, Refusal):
            refusals.append((name, found.reason))
            continue
        ctx.refusals[node] = refusals
        ctx.current_rule = name
        found()
        return name
    params = [ctx.trainable[a.name] for a in node.all_input_nodes if ctx.is_param(a)]
    what = f"parameter {params[0]!r} in " if params else ""
    lines = "\n".join(f"  {name}: {reason}" for name, reason in refusals)
    raise UncoveredParameterUseError(
        f"no rewrite rule covers {what}node {node.name!r} (op {op_name(node.target)}). Each rule's reason:\n{lines}\n"
        "Freeze the parameters that reach it (requires_grad=False), or express the op with a deterministic, "
        "functional one."
    )


def _output(node: Node, ctx: RewriteContext) -> None:
    outs = []
    for a in pytree.tree_flatten(node.args)[0]:
        if not isinstance(a, Node):
            outs.append(a)
            continue
        layout = ctx.layout_of(a)
        if layout in (GRP, INV):
            outs.append(ctx.as_grouped(a))
        elif layout == PG and ctx.batch_dim(a) is not None:
            outs.append(ctx.emit(ops.concat_groups, (ctx.new[a], ctx.batch_dim(a))))
        else:
            raise UnsupportedGraphError(
                f"model output {a.name} depends on a perturbation but has no single batch dimension "
                f"(layout {layout}, batch dims {ctx.batch_dims(a)}): the groups' values cannot be told apart"
            )
    ctx.g.output(tuple(outs))


def _is_batch_input(captured: CapturedModel, node: Node) -> bool:
    return any(ph == node.name and kind == "input" for ph, kind, _ in captured.inputs)


def check_postconditions(gm: GraphModule, ctx: RewriteContext) -> None:
    """Every trainable parameter placeholder feeds only perturbation-aware ops; the graph lints."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in ctx.trainable:
            for user in node.users:
                if user.target not in PERTURBATION_AWARE:
                    raise AssertionError(
                        f"rewrite postcondition: parameter {ctx.trainable[node.name]!r} is read unperturbed by "
                        f"{user.name} ({op_name(user.target)}); this is a bug in zo_fx's rewrite rules"
                    )
    gm.graph.lint()


def rewrite(captured: CapturedModel, groups: int, kind: str, impl: str = "auto",
            grouped_inputs: bool = False) -> Rewritten:
    """Rewrite ``captured`` to evaluate ``groups`` perturbed copies in one pass.

    ``grouped_inputs``: the batch tensors arrive already grouped (G slices of their batch dim,
    group-major, each group its own examples), as in decoding, where every group has generated
    its own tokens; by default they are the B shared examples.
    """
    ctx = RewriteContext(captured, groups, kind, impl)
    rules: dict[str, str] = {}
    for node in captured.graph_module.graph.nodes:
        if node.op == "placeholder":
            layout = PARAM if ctx.is_param(node) else INV
            if grouped_inputs and layout == INV and ctx.batch_dim(node) is not None and _is_batch_input(captured, node):
                layout = GRP
            ctx.set(node, ctx.g.placeholder(node.name), layout)
            ctx.new[node].meta = dict(node.meta)
            continue
        if ctx.seeds is None:  # after the graph's own placeholders: the group table
            ctx.seeds = ctx.g.placeholder("zo_seeds")
            ctx.scales = ctx.g.placeholder("zo_scales")
        if node.op == "get_attr":
            ctx.set(node, ctx.g.get_attr(node.target), INV)
        elif node.op == "call_function":
            rules[node.name] = _rewrite_node(node, ctx)
        elif node.op == "output":
            _output(node, ctx)
        else:
            raise UnsupportedGraphError(f"unexpected node kind {node.op} ({node.name})")
    gm = GraphModule(captured.graph_module, ctx.g)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    check_postconditions(gm, ctx)
    layouts = {n.name: layout for n, layout in ctx.layout.items() if n.op == "call_function"}
    return Rewritten(gm, ctx.uses, Counter(layouts.values()), groups, layouts, rules)
