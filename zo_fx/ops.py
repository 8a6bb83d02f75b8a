"""Perturbation-aware ops: what the rewritten graph calls at every use of a trainable parameter.

Each op evaluates G *groups* at once. Group g sees the parameter
``theta + scales[g] * u(seeds[g], pid)`` (``scales[g] = eps * c_g``; 0 means the plain
weights). Tensors flowing through the rewritten graph come in three layouts:

* invariant: the original tensor for the B examples (depends on no perturbed parameter);
* grouped: the tensor the original graph would give on the batch repeated G times,
  i.e. G slices of the batch dimension, group-major;
* per-group: G values, one per group, made at once (:class:`PerGroup`: a perturbed
  bias or norm weight, what an op that mixes examples returned for each group's slice)
  or on demand (:class:`LazyGroups`: a value derived from parameters alone, such as an
  adapter's delta weight, made for one group when a consumer asks for it, so that G
  weight-sized values never exist at once).

The torch path of each op calls the per-group functions of :mod:`zo_fx.kernels` (one
perturbed linear, :func:`zo_fx.kernels.linear.perturbed_linear`, for every matmul-like
use); ops with a Triton kernel have one dispatch point (``impl``, decided by
:func:`zo_fx.kernels.dispatch.pick`). Nothing here ever writes a parameter, and no op
holds more than one weight-sized temporary at a time.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import kernels
from .kernels import blocked, lowrank, scaling
from .kernels._chunks import accumulation_dtype
from .kernels.dispatch import pick
from .kernels.linear import perturbed_linear
from .kernels.perturb import perturbed_groups, perturbed_or_base
from .streams.layout import element_kind, is_lazy, is_lowrank, rank_of, sample_at
from .streams.table import seeds_from_tensor

# leaf codes of map_groups (a non-negative code is the batch dim of a grouped tensor)
PASS = -1  # same value for every group
PER_GROUP = -2  # per-group values: group g takes element g


class PerGroup(list):
    """G values, one per group (a pytree leaf: map_groups must not flatten it)."""


class LazyGroups:
    """G values made on demand: ``lazy[g]`` computes group g's value when a consumer asks for it.

    A value derived from parameters alone (LoHa's ``(A1 B1) * (A2 B2)``, DoRA's adapted
    weight) has the size of a weight matrix; holding it for all G groups would cost G
    weights of memory. Consumers run group by group and ask for one group at a time, so
    one such value is alive per consumer. ``cache`` keeps the last group's value for a
    value with several consumers (each asks for group g before any asks for g + 1).
    """

    __slots__ = ("make", "groups", "cache", "_last")

    def __init__(self, make, groups: int, cache: bool = False):
        self.make = make
        self.groups = groups
        self.cache = cache
        self._last = None

    def __getitem__(self, g: int):
        if self.cache and self._last is not None and self._last[0] == g:
            return self._last[1]
        value = self.make(g)
        if self.cache:
            self._last = (g, value)
        return value

    def __len__(self) -> int:
        return self.groups


def _is_per_group(x) -> bool:
    return isinstance(x, (PerGroup, LazyGroups))


def _table(seeds: torch.Tensor, scales: torch.Tensor) -> tuple[list[int], list[float]]:
    # seeds travel as int64 (two's complement of the uint64 seed)
    return seeds_from_tensor(seeds), [float(s) for s in scales.tolist()]


def _kernel(impl: str, name: str, *tensors):
    """The dispatch point: the Triton entry point ``name`` when ``impl`` picks Triton for these tensors.

    Looked up at call time, so a kernel module reloaded under ``TRITON_INTERPRET=1`` is the one used.
    """
    if pick(impl, *tensors) != "triton":
        return None
    return getattr(kernels, name)


def _split(x: torch.Tensor, groups: int, bdim: int) -> Sequence[torch.Tensor]:
    return x.chunk(groups, dim=bdim)


@torch.compiler.disable
def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_pid: int | None,
    b_pid: int | None,
    seeds: torch.Tensor,
    scales: torch.Tensor,
    kind: str,
    groups: int,
    x_bdim: int,
    weight_layout: str = "out_in",
    impl: str = "auto",
    weight_shape: tuple | None = None,
) -> torch.Tensor:
    """``x @ W_g^T + b_g`` (layout ``out_in``, nn.Linear) or ``x @ W_g + b_g`` (``in_out``, Conv1D/mm).

    ``x_bdim >= 0``: x is grouped along that dim; ``x_bdim == PASS``: x is invariant and
    shared by every group (the direction-invariant case; its batch dim is dim 0). The
    result is grouped along ``x_bdim`` (dim 0 when x is shared). ``weight_shape``: the
    parameter is used through a reshape (a view in its own element order: the direction
    of element k is still the parameter's element k).
    """
    seed_list, scale_list = _table(seeds, scales)
    shared = x_bdim == PASS
    out_dim = 0 if shared else x_bdim
    if is_lowrank(kind):
        return _lowrank_linear(x, weight, bias, w_pid, b_pid, seed_list, scale_list, kind, groups, x_bdim,
                               weight_layout, weight_shape)
    if weight_shape is not None:
        weight = weight.view(weight_shape)
    # a per-element direction scale (HiZOO) is applied by the blocked and the per-group torch paths
    fused = not scaling.applies(w_pid, b_pid)
    kernel = _kernel(impl, "grouped_linear", x, weight, bias) if fused else None
    if kernel is not None and x.dim() >= 2 and out_dim == 0:
        xs = x.reshape(-1, x.shape[-1]) if shared else x.reshape(groups, -1, x.shape[-1])
        y = kernel(xs, weight, bias, w_pid, b_pid, seed_list, scale_list, kind,
                   shared_input=shared, weight_layout=weight_layout, impl="triton")
        lead = list(x.shape[:-1])
        if shared:
            lead[0] = lead[0] * groups
        return y.reshape(*lead, y.shape[-1])
    if out_dim == 0 and x.dim() >= 2 and blocked.supports(weight, weight_layout, x, bias):
        k = x.shape[-1]
        xs = x.reshape(-1, k) if shared else x.reshape(groups, -1, k)
        y = blocked.blocked_grouped_matmul(xs, weight, w_pid, seed_list, scale_list, kind, weight_layout,
                                           shared_input=shared, factor=_direction_factor(weight, w_pid))
        _add_group_bias(y, bias, b_pid, seed_list, scale_list, kind)
        lead = list(x.shape[:-1])
        lead[0] *= groups if shared else 1
        return y.view(*lead, y.shape[-1])
    xs = [x] * groups if shared else _split(x, groups, x_bdim)
    if out_dim == 0 and x.dim() >= 2:
        # write each group's rows straight into the result: no list of G outputs plus a copy
        n_out = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
        rows = xs[0].reshape(-1, x.shape[-1]).shape[0]
        out = torch.empty(groups, rows, n_out, dtype=torch.result_type(x, weight), device=x.device)
        for g in range(groups):
            perturbed_linear(xs[g], weight, bias, w_pid, b_pid, seed_list[g], scale_list[g], kind, weight_layout,
                             out=out[g])
        lead = list(xs[0].shape[:-1])
        lead[0] *= groups
        return out.view(*lead, n_out)
    outs = [
        perturbed_linear(xs[g], weight, bias, w_pid, b_pid, seed_list[g], scale_list[g], kind, weight_layout)
        for g in range(groups)
    ]
    return torch.cat(outs, dim=out_dim)


def _lowrank_linear(x, weight, bias, w_pid, b_pid, seeds: list[int], scales: list[float], kind: str, groups: int,
                    x_bdim: int, layout: str, weight_shape) -> torch.Tensor:
    """:func:`grouped_linear` under low-rank directions: the shared GEMM once, two skinny GEMMs per group.

    A weight used through a reshape is perturbed densely in its stored shape (its direction is
    defined there) and then viewed, group by group.
    """
    shared = x_bdim == PASS
    if weight_shape is not None:
        outs = []
        xs = [x] * groups if shared else _split(x, groups, x_bdim)
        for g in range(groups):
            w = perturbed_or_base(weight, seeds[g], w_pid, scales[g], kind).view(weight_shape)
            b = perturbed_or_base(bias, seeds[g], b_pid, scales[g], kind)
            y = F.linear(xs[g], w) if layout == "out_in" else xs[g] @ w
            outs.append(y if b is None else y + b)
        return torch.cat(outs, dim=0 if shared else x_bdim)
    y = lowrank.grouped_linear(x, weight, seeds, scales, w_pid, rank_of(kind), groups, shared, x_bdim, layout,
                               is_lazy(kind))
    _add_group_bias(y, bias, b_pid, seeds, scales, element_kind(kind))
    if shared:
        lead = list(x.shape[:-1])
        lead[0] *= groups
        return y.reshape(*lead, y.shape[-1])
    moved = x.movedim(x_bdim, 0).shape
    return y.reshape(*moved[:-1], y.shape[-1]).movedim(0, x_bdim)


def _direction_factor(weight: torch.Tensor, w_pid) -> torch.Tensor | None:
    """The weight's per-element direction scale (HiZOO's ``1 / sqrt(H)``) when one is active now, else None."""
    return scaling.factor_for(w_pid, accumulation_dtype(weight.dtype))


def _add_group_bias(y: torch.Tensor, bias, b_pid, seeds: list[int], scales: list[float], kind: str) -> None:
    """``y[g] += b_g`` for a ``[G, rows, N]`` product: the perturbed biases from one generator call."""
    if bias is None:
        return
    if b_pid is None:
        y += bias
        return
    for g, b in enumerate(perturbed_groups(bias, seeds, b_pid, scales, kind)):
        y[g] += b


def head_logits(x: torch.Tensor, weight, bias, w_pid, b_pid, seed: int, scale: float, kind: str,
                layout: str) -> torch.Tensor:
    """One group's output head over all of ``x``'s rows (the head cut off by the readout pass).

    A large vocabulary's head is walked in cache-sized tiles of its rows, never copied whole.
    """
    if is_lowrank(kind):
        if w_pid is not None and x.dim() >= 2:
            rows = x.reshape(-1, x.shape[-1])
            y = lowrank.grouped_linear(rows, weight, [seed], [scale], w_pid, rank_of(kind), 1, True, PASS, layout,
                                       is_lazy(kind))
            _add_group_bias(y, bias, b_pid, [seed], [scale], element_kind(kind))
            return y[0].view(*x.shape[:-1], y.shape[-1])
        kind = element_kind(kind) if w_pid is None else kind
    if x.dim() < 2 or not blocked.supports(weight, layout, x, bias):
        return perturbed_linear(x, weight, bias, w_pid, b_pid, seed, scale, kind, layout)
    rows = x.reshape(-1, x.shape[-1])
    y = blocked.blocked_grouped_matmul(rows, weight, w_pid, [seed], [scale], kind, layout, shared_input=True,
                                       factor=_direction_factor(weight, w_pid) if scale != 0.0 else None)
    _add_group_bias(y, bias, b_pid, [seed], [scale], kind)
    return y[0].view(*x.shape[:-1], y.shape[-1])


#: the logits of one head call may take this much memory even where the head's weight is smaller
HEAD_LOGITS_MIN_BYTES = 64 << 20


def head_logits_budget(weight: torch.Tensor) -> int:
    """Bytes the logits of one head call may take: the head's weight size, at least HEAD_LOGITS_MIN_BYTES.

    The step already holds the weight, so logits of its size at most keep the step's memory at the
    inference level; a head larger than its logits per group (a large vocabulary over a few rows)
    is then read once for several groups instead of once per group.
    """
    return max(HEAD_LOGITS_MIN_BYTES, weight.numel() * weight.element_size())


def groups_per_head_call(groups: int, hidden: torch.Tensor, weight: torch.Tensor, layout: str) -> int:
    """How many groups share one head call: as many as keep their logits within :func:`head_logits_budget`."""
    rows = hidden.numel() // max(1, hidden.shape[-1]) // max(1, groups)
    n_out = weight.shape[0] if layout == "out_in" else weight.shape[1]
    per_group = rows * n_out * max(weight.element_size(), 4)  # float32 logits at least
    return max(1, min(groups, head_logits_budget(weight) // max(1, per_group)))


def head_calls(hidden: torch.Tensor, weight, bias, w_pid, b_pid, table, layout: str):
    """``(g0, g1, logits of groups g0..g1-1)`` over the groups of ``table``, as many per call as
    :func:`groups_per_head_call` allows; ``hidden`` holds every group's rows group-major along dim 0."""
    per_call = groups_per_head_call(table.groups, hidden, weight, layout)
    rows = hidden.shape[0] // table.groups
    for g0 in range(0, table.groups, per_call):
        g1 = min(table.groups, g0 + per_call)
        yield g0, g1, grouped_head_logits(hidden[g0 * rows : g1 * rows], weight, bias, w_pid, b_pid,
                                          list(table.seeds[g0:g1]), list(table.scales[g0:g1]), table.kind, layout)


def grouped_head_logits(x: torch.Tensor, weight, bias, w_pid, b_pid, seeds: list[int], scales: list[float], kind: str,
                        layout: str) -> torch.Tensor:
    """Several groups' output heads at once: ``x`` holds their rows group-major along dim 0.

    One read of the head's weight serves every group of the call (a large vocabulary's head is
    the model's largest matrix: per group, it would be read G times), each distinct direction
    is generated once, and the groups' rows share one GEMM where the kind allows it (low-rank,
    a frozen head). Returns ``[G * B, ..., V]`` in ``x``'s order.
    """
    groups = len(seeds)
    if groups == 1:  # its logits as they are: a cat of one would copy a vocabulary-wide tensor
        return head_logits(x, weight, bias, w_pid, b_pid, seeds[0], scales[0], kind, layout)

    def one_group_at_a_time():
        return torch.cat([head_logits(h, weight, bias, w_pid, b_pid, seeds[g], scales[g], kind, layout)
                          for g, h in enumerate(x.chunk(groups, dim=0))])

    if x.dim() < 2:
        return one_group_at_a_time()
    n_out = weight.shape[0] if layout == "out_in" else weight.shape[1]
    xs = x.reshape(groups, -1, x.shape[-1])
    if is_lowrank(kind):
        if w_pid is not None:
            y = lowrank.grouped_linear(xs, weight, seeds, scales, w_pid, rank_of(kind), groups, False, 0, layout,
                                       is_lazy(kind))
            _add_group_bias(y, bias, b_pid, seeds, scales, element_kind(kind))
            return y.view(*x.shape[:-1], n_out)
        kind = element_kind(kind)
    if not blocked.supports(weight, layout, x, bias):
        return one_group_at_a_time()
    moved = any(s != 0.0 for s in scales)
    y = blocked.blocked_grouped_matmul(xs, weight, w_pid, seeds, scales, kind, layout, shared_input=False,
                                       factor=_direction_factor(weight, w_pid) if moved else None)
    _add_group_bias(y, bias, b_pid, seeds, scales, kind)
    return y.view(*x.shape[:-1], n_out)


def head_readout(x_rows: torch.Tensor, weight, bias, w_pid, b_pid, seed: int, scale: float, kind: str,
                 layout: str, token_ids: torch.Tensor) -> torch.Tensor:
    """One group's logits of ``token_ids`` only: the head's rows for those tokens, perturbed there only."""
    if layout == "out_in":  # weight [V, D]: row t holds elements t*D .. t*D+D-1
        dim = weight.shape[1]
        rows = weight[token_ids]
        index = token_ids.unsqueeze(-1) * dim + torch.arange(dim, device=weight.device)
    else:  # weight [D, V]: column t holds elements d*V + t
        vocab = weight.shape[1]
        rows = weight[:, token_ids].t()
        index = token_ids.unsqueeze(-1) + torch.arange(weight.shape[0], device=weight.device) * vocab
    if w_pid is not None and scale != 0.0:
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        u = (lowrank.readout_rows(weight, token_ids, layout, w_pid, seed, rank_of(kind), acc, is_lazy(kind))
             if is_lowrank(kind)
             else sample_at(seed, w_pid, index, kind, dtype=acc))
        factor = scaling.factor_for(w_pid, acc)
        if factor is not None:
            u = factor.reshape(-1)[index] * u
        rows = (rows.to(acc) + scale * u).to(weight.dtype)
    logits = x_rows @ rows.t()
    if bias is not None:
        logits = logits + perturbed_or_base(bias, seed, b_pid, scale, kind)[token_ids]
    return logits


@torch.compiler.disable
def grouped_embedding(
    weight: torch.Tensor,
    ids: torch.Tensor,
    pid: int,
    seeds: torch.Tensor,
    scales: torch.Tensor,
    kind: str,
    groups: int,
    ids_bdim: int,
    padding_idx: int = -1,
    impl: str = "auto",
) -> torch.Tensor | list[torch.Tensor]:
    """Rows ``W[ids] + scale_g * U_g[ids]``, the perturbation generated at the looked-up rows only.

    Returns a per-group list of G row tensors. ``ids_bdim >= 0``: ids are grouped along
    that dim and group g looks up its own slice; ``ids_bdim == PASS``: ids are shared
    (invariant) and every group looks up all of them (the base rows are gathered once).
    The rewrite concatenates the list along the batch dim (:func:`grouped_embedding_cat`)
    when the result carries the batch, and keeps it per group otherwise.
    """
    seed_list, scale_list = _table(seeds, scales)
    if is_lowrank(kind):
        id_groups = _split(ids, groups, ids_bdim) if ids_bdim >= 0 else [ids] * groups
        return PerGroup(lowrank.embedding_rows(weight, id_groups[g], pid, seed_list[g], scale_list[g], rank_of(kind),
                                               padding_idx, is_lazy(kind)) for g in range(groups))
    fused = ids_bdim == PASS and padding_idx == -1 and not scaling.applies(pid)
    kernel = _kernel(impl, "grouped_embedding", weight) if fused else None
    if kernel is not None:
        return PerGroup(kernel(weight, ids, pid, seed_list, scale_list, kind, impl="triton").unbind(0))
    id_groups = _split(ids, groups, ids_bdim) if ids_bdim >= 0 else [ids] * groups
    dim = weight.shape[1]
    outs = []
    base_rows = None
    for g in range(groups):
        rows = F.embedding(id_groups[g], weight, padding_idx) if ids_bdim >= 0 or base_rows is None else base_rows
        if ids_bdim == PASS:
            base_rows = rows
        if scale_list[g] != 0.0:
            flat = id_groups[g].unsqueeze(-1) * dim + torch.arange(dim, device=ids.device)
            u = sample_at(seed_list[g], pid, flat, kind, dtype=torch.float32)
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            factor = scaling.factor_for(pid, acc)
            if factor is not None:
                u = factor.reshape(-1)[flat] * u.to(acc)
            rows = (rows.to(acc) + scale_list[g] * u.to(acc)).to(weight.dtype)
        outs.append(rows)
    return PerGroup(outs)


def grouped_embedding_cat(outs: list[torch.Tensor], bdim: int) -> torch.Tensor:
    return torch.cat(outs, dim=bdim)


@torch.compiler.disable
def per_group_params(
    param: torch.Tensor, pid: int, seeds: torch.Tensor, scales: torch.Tensor, kind: str, groups: int
) -> list[torch.Tensor]:
    """The G perturbed copies of a small parameter (a bias, a norm weight, a scale)."""
    seed_list, scale_list = _table(seeds, scales)
    return PerGroup(perturbed_groups(param, seed_list, pid, scale_list, kind))


def op_ref(target):
    """How a graph node's target travels as an argument of map_groups / lazy_map.

    FX prints an ATen op in generated code but not a Python function (``operator.getitem``
    on a multi-output op, ``operator.mul`` on sizes): those travel as their qualified name.
    """
    if isinstance(target, torch._ops.OpOverload):
        return target
    module = getattr(target, "__module__", None) or "operator"
    return f"{'operator' if module == '_operator' else module}:{target.__qualname__}"


def _resolve(op):
    if not isinstance(op, str):
        return op
    module, _, name = op.partition(":")
    value = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


@torch.compiler.disable
def lazy_param(param: torch.Tensor, pid: int, seeds: torch.Tensor, scales: torch.Tensor, kind: str,
               groups: int) -> LazyGroups:
    """A parameter's G perturbed copies, each made when a consumer asks for it (a large parameter)."""
    seed_list, scale_list = _table(seeds, scales)
    return LazyGroups(lambda g: perturbed_or_base(param, seed_list[g], pid, scale_list[g], kind), groups)


def lazy_map(op, groups: int, leaf_codes: tuple, args: tuple, kwargs: dict, cache: bool) -> LazyGroups:
    """``op`` on per-group (lazy or made) and shared inputs, evaluated for one group when asked."""
    leaves, spec = pytree.tree_flatten((args, kwargs), is_leaf=_is_per_group)
    op = _resolve(op)

    def make(g: int):
        picked = [_pick(leaf, code, g, groups, {}) for leaf, code in zip(leaves, leaf_codes)]
        a, k = pytree.tree_unflatten(picked, spec)
        return op(*a, **k)

    return LazyGroups(make, groups, cache)


def group_size(size, groups: int):
    """A batch-dependent size read off a grouped tensor, as the original graph saw it (one group's)."""
    return size // groups


def _pick(leaf: Any, code: int, g: int, groups: int, pieces: dict) -> Any:
    if code == PASS:
        return leaf
    if code == PER_GROUP:
        return leaf[g]
    key = id(leaf)
    if key not in pieces:
        pieces[key] = _split(leaf, groups, code)
    return pieces[key][g]


@torch.compiler.disable
def map_groups(op, groups: int, leaf_codes: tuple, out_bdims: tuple, args: tuple, kwargs: dict) -> Any:
    """Run ``op`` once per group on that group's slice of every input.

    ``leaf_codes`` has one code per leaf of ``pytree.tree_flatten((args, kwargs))``.
    ``out_bdims`` has one entry per leaf of the op's output: the batch dim along which
    the G results are concatenated into a grouped tensor. When any entry is
    ``PER_GROUP`` the G results are returned as they are (a :class:`PerGroup`).
    """
    leaves, spec = pytree.tree_flatten((args, kwargs), is_leaf=_is_per_group)
    op = _resolve(op)
    pieces: dict = {}
    results = []
    for g in range(groups):
        picked = [_pick(leaf, code, g, groups, pieces) for leaf, code in zip(leaves, leaf_codes)]
        a, k = pytree.tree_unflatten(picked, spec)
        results.append(op(*a, **k))
    if any(d == PER_GROUP for d in out_bdims):
        return PerGroup(results)
    out_leaves = [pytree.tree_flatten(r)[0] for r in results]
    out_spec = pytree.tree_flatten(results[0])[1]
    merged = []
    for i, d in enumerate(out_bdims):
        column = [leaves_g[i] for leaves_g in out_leaves]
        merged.append(torch.cat(column, dim=d) if isinstance(column[0], torch.Tensor) else column[0])
    return pytree.tree_unflatten(merged, out_spec)


def repeat_groups(x: torch.Tensor, groups: int, bdim: int) -> torch.Tensor:
    """An invariant tensor in the grouped layout: G copies along its batch dim."""
    return torch.cat([x] * groups, dim=bdim)


def scale_size(size, groups: int):
    """An invariant batch-dependent size in the grouped layout."""
    return operator.mul(size, groups)


def concat_groups(values: PerGroup, bdim: int) -> torch.Tensor:
    """Per-group batch tensors as one grouped tensor (for the graph's output)."""
    return torch.cat(list(values), dim=bdim)
