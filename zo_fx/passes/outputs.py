"""What a captured forward returns, and how the per-group results are put back into the model's own output.

A language model's loss reads one tensor, the logits, and that is the fast path: the graph
returns the logits alone and the output head can be fused into the loss
(:mod:`zo_fx.passes.readout`). Other heads return other things: span QA returns
``start_logits`` and ``end_logits``, a custom model a tuple or a dict of tensors. For those
the graph returns every tensor of the output (flattened as a pytree), the rewrite carries
each one per group like any other value, and the runtime rebuilds the model's own output
object (a ``ModelOutput``, tuple, dict, ...) from them, so a loss reads
``outputs.start_logits`` with all G groups' rows in it, group-major, as it reads logits.

A tensor without the batch as its first dimension (a scalar auxiliary loss, a router
statistic over all tokens) has no per-example value and mixes the examples: the groups'
values of it could not be told apart. It is left out of the graph and rebuilt as
``None``, and :attr:`OutputStructure.dropped` names it, so a loss that reads it fails
loudly instead of seeing a number that averages all groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..losses import logits_field

#: what the graph returns: the logits alone (``"logits"``), every tensor of the output (``"all"``),
#: or the logits when the output has them and everything otherwise (``"auto"``)
OUTPUT_MODES = ("auto", "logits", "all")


def check_output_mode(mode: str) -> str:
    if mode not in OUTPUT_MODES:
        raise ValueError(f"outputs must be one of {OUTPUT_MODES}; got {mode!r}")
    return mode


@dataclass
class OutputStructure:
    """How the graph's output tensors map back onto the model's output object."""

    spec: pytree.TreeSpec
    #: every leaf of the output as pytree paths (``.start_logits``, ``[1]``, ``['scores']``)
    names: tuple[str, ...]
    #: leaf positions the graph returns, in graph output order
    kept: tuple[int, ...]
    #: non-tensor leaves (ints, None, strings): put back as they were
    constants: dict[int, object]
    #: tensor leaves left out (no batch dimension first), rebuilt as None
    dropped: tuple[str, ...] = ()

    def without(self, positions: set[int]) -> OutputStructure:
        """The same structure with the graph outputs at ``positions`` (indices into ``kept``) left out."""
        gone = tuple(self.names[self.kept[i]] for i in sorted(positions))
        kept = tuple(k for i, k in enumerate(self.kept) if i not in positions)
        return OutputStructure(self.spec, self.names, kept, self.constants, self.dropped + gone)

    def rebuild(self, tensors) -> object:
        """The model's output object from the graph's output tensors (dropped leaves as None)."""
        leaves: list = [self.constants.get(i) for i in range(len(self.names))]
        for position, tensor in zip(self.kept, tensors):
            leaves[position] = tensor
        return pytree.tree_unflatten(leaves, self.spec)


def _path_name(path) -> str:
    """``start_logits``, ``1``, ``scores.0``: a leaf's place in the output, as a user would name it."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def flatten_output(out, mode: str) -> tuple[tuple[torch.Tensor, ...], OutputStructure | None]:
    """The tensors a captured forward returns for the model output ``out``, and how to rebuild it.

    The structure is None when the graph returns one tensor that the loss receives as is
    (a plain tensor output, or the logits in ``"logits"`` / ``"auto"`` mode).
    """
    if isinstance(out, torch.Tensor):
        return (out,), None
    logits = logits_field(out)
    if mode == "logits" or (mode == "auto" and logits is not None):
        if logits is None:
            raise TypeError(
                f"outputs='logits' needs the model to return a tensor or an output with .logits; got "
                f"{type(out).__name__}. Compile with outputs='all' to give the loss the whole output object"
            )
        return (logits,), None
    with_paths, spec = pytree.tree_flatten_with_path(out)
    names = tuple(_path_name(path) for path, _ in with_paths)
    kept = tuple(i for i, (_, leaf) in enumerate(with_paths) if isinstance(leaf, torch.Tensor))
    if not kept:
        raise TypeError(
            f"the model returned {type(out).__name__} with no tensor in it; zo_fx needs the tensors a loss reads"
        )
    constants = {i: leaf for i, (_, leaf) in enumerate(with_paths) if not isinstance(leaf, torch.Tensor)}
    return tuple(with_paths[i][1] for i in kept), OutputStructure(spec, names, kept, constants)


def describe(structure: OutputStructure | None) -> str:
    """One line for the report: what the loss receives."""
    if structure is None:
        return "the loss receives one tensor (the logits or the model's tensor output)"
    kind = structure.spec.type.__name__ if structure.spec.type is not None else "output"
    kept = ", ".join(structure.names[i] or "(output)" for i in structure.kept)
    line = f"the loss receives the model's {kind} with {kept} per group"
    if structure.dropped:
        line += f"; left out (no batch dimension first, rebuilt as None): {', '.join(structure.dropped)}"
    return line
