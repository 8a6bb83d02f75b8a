"""``ZOModule.report()``: which rule handles each parameter use, and what runs once vs G times."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .capture import CapturedModel
from .rewrite import GRP, INV, LAZY, PG, Rewritten


@dataclass
class ZOReport:
    #: trainable parameter -> [(node, op, rule), ...]
    uses: dict[str, list[tuple[str, str, str]]]
    #: (parameter, node) -> [(rule, reason), ...] of the rules that refused that use before one took it
    refusals: dict
    frozen: list[str]
    uncovered: list[str]
    rule_counts: Counter
    layout_counts: Counter
    graph_nodes: int
    rewritten_nodes: int
    trainable_numel: int
    frozen_numel: int
    groups: int
    per_group_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def all_covered(self) -> bool:
        return not self.uncovered

    def summary(self) -> str:
        rules = ", ".join(f"{r}: {n}" for r, n in sorted(self.rule_counts.items()))
        return (
            f"{len(self.uses)} trainable tensors ({self.trainable_numel:,} elements), {len(self.frozen)} frozen "
            f"({self.frozen_numel:,}); parameter uses by rule: {rules}; graph: {self.graph_nodes} nodes captured, "
            f"{self.rewritten_nodes} after rewrite; run once (invariant): {self.layout_counts.get(INV, 0)}, "
            f"run on G*B rows (grouped): {self.layout_counts.get(GRP, 0)}, run per group: "
            f"{self.layout_counts.get(PG, 0)} (+{self.per_group_nodes} grouped by concatenation), parameter-only "
            f"per group: {self.layout_counts.get(LAZY, 0)}; unused trainable tensors: {len(self.uncovered)}"
        )

    def __str__(self) -> str:
        lines = [f"zo_fx report (G={self.groups})", self.summary(), ""]
        width = max((len(n) for n in self.uses), default=10)
        for name, uses in self.uses.items():
            desc = "; ".join(f"{rule} @ {node} ({op})" for node, op, rule in uses)
            lines.append(f"  {name:<{width}}  {desc}")
            for node, _, rule in uses:
                refused = self.refusals.get((name, node))
                if refused and rule == "per-group":  # the slowest rule: say why no faster one took it
                    why = "; ".join(f"{r}: {reason}" for r, reason in refused
                                    if r != "invariant" and not reason.startswith(("not a ", "not an ")))
                    lines.append(f"  {'':<{width}}    {node} runs per group: {why}")
        if self.frozen:
            lines.append(f"  frozen: {', '.join(self.frozen[:8])}{' ...' if len(self.frozen) > 8 else ''}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def build_report(captured: CapturedModel, rewritten: Rewritten, model: torch.nn.Module) -> ZOReport:
    uses: dict[str, list] = defaultdict(list)
    for u in rewritten.uses:
        uses[u.parameter].append((u.node, u.op, u.rule))
    trainable = list(captured.pids)
    ordered = {name: uses.get(name, []) for name in trainable}
    uncovered = [name for name, u in ordered.items() if not u]
    frozen = [n for n, p in captured.params.items() if n not in captured.pids]
    notes = []
    if uncovered:
        notes.append(f"trainable parameters never used by the forward: {uncovered}")
    per_group = sum(1 for rule in rewritten.node_rules.values() if rule == "per-group")
    return ZOReport(
        uses=ordered,
        refusals={(u.parameter, u.node): u.refusals for u in rewritten.uses},
        per_group_nodes=max(0, per_group - rewritten.layouts.get(PG, 0)),
        frozen=frozen,
        uncovered=uncovered,
        rule_counts=Counter(u.rule for u in rewritten.uses),
        layout_counts=rewritten.layouts,
        graph_nodes=len(captured.graph_module.graph.nodes),
        rewritten_nodes=len(rewritten.graph_module.graph.nodes),
        trainable_numel=sum(captured.params[n].numel() for n in trainable),
        frozen_numel=sum(captured.params[n].numel() for n in frozen),
        groups=rewritten.groups,
        notes=notes,
    )
