"""``zo_compile`` and the ``ZOModule`` it returns.

A ZOModule owns the captured graph and, per group count and direction kind, a
rewritten graph that evaluates G perturbed copies of the model in one pass. It reads
the model's parameters live at every call, so the optimizers' in-place updates are
seen immediately, and it never writes a parameter itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch

from .kernels.dispatch import check_impl
from .kernels.perturb import perturbed
from .losses import LossFn, default_loss
from .ops import head_calls, head_readout
from .passes.capture import DEFAULT_LOSS_KEYS, CapturedModel, ExportFailedError, capture, live_inputs, model_input_keys
from .passes.outputs import check_output_mode
from .passes.outputs import describe as describe_outputs
from .passes.readout import Head, cut_head
from .passes.report import ZOReport, build_report
from .passes.rewrite import Rewritten, rewrite
from .streams.layout import check_direction_kind
from .streams.table import GroupTable

BACKENDS = ("eager", "inductor")


def repeat_batch(batch: dict, groups: int, batch_size: int) -> dict:
    """The batch as the grouped outputs see it: every per-example tensor repeated G times."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size:
            out[k] = torch.cat([v] * groups, dim=0)
        else:
            out[k] = v
    return out


def check_per_example(losses, groups: int, batch_size: int) -> None:
    """A loss gives one value per example of every group it saw, or a clear error."""
    n = groups * batch_size
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"the loss must return one value per example ({n} for {groups} group(s) of {batch_size}); got {got}. "
            "Reduce over tokens, never over the batch (reduction='none', then a mean per example)"
        )


class ZOModule:
    """A model compiled for zeroth-order training: G perturbed copies per forward pass."""

    def __init__(self, model: torch.nn.Module, captured: CapturedModel, loss: LossFn, impl: str, backend: str,
                 fuse_head: bool = True, loss_keys: tuple = DEFAULT_LOSS_KEYS):
        self.model = model
        self.loss_keys = tuple(loss_keys)
        self.captured = captured
        cut = cut_head(captured) if fuse_head else None
        self.headless: CapturedModel | None = cut[0] if cut else None
        self.head: Head | None = cut[1] if cut else None
        self.loss_fn = loss
        self.impl = impl
        self.backend = backend
        self._graphs: dict[tuple[int, str], Callable] = {}
        self._rewritten: dict[tuple[int, str], Rewritten] = {}
        self._decoder = None
        # what check_batch compares a batch and the parameters with: the captured graph's placeholders
        values = {ph: node.meta.get("val") for ph, node in captured.placeholders().items()}
        self._input_specs = {key: (values[ph].dtype, values[ph].dim()) for ph, kind, key in captured.inputs
                             if kind == "input" and values[ph] is not None}
        self._param_dtypes = {key: values[ph].dtype for ph, kind, key in captured.inputs
                              if kind == "parameter" and values[ph] is not None}

    # ---- parameters --------------------------------------------------------------------------------
    @property
    def pids(self) -> dict[str, int]:
        """Stream id of every trainable parameter (tied parameters once)."""
        return self.captured.pids

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: self.captured.params[name] for name in self.captured.pids}

    def direction(self, seed: int, kind: str = "rademacher", rank: int | None = None) -> dict[str, torch.Tensor]:
        """Direction ``seed`` materialised per trainable parameter, exactly as the forward uses it.

        ``kind="lowrank", rank=r`` (or ``kind="lowrank:r"``): each matrix's dense ``A B^T / sqrt(r)``, which
        a step never forms; for tests and inspection.
        """
        kind = check_direction_kind(kind, rank)
        with torch.no_grad():
            return {
                name: perturbed(torch.zeros_like(p), seed, self.pids[name], 1.0, kind)
                for name, p in self.trainable_parameters().items()
            }

    # ---- graphs --------------------------------------------------------------------------------------
    def rewritten(self, groups: int, kind: str, headless: bool = False) -> Rewritten:
        key = (groups, kind, headless)
        if key not in self._rewritten:
            captured = self.headless if headless else self.captured
            self._rewritten[key] = rewrite(captured, groups, kind, self.impl)
        return self._rewritten[key]

    def _graph(self, groups: int, kind: str, headless: bool = False) -> Callable:
        key = (groups, kind, headless)
        if key not in self._graphs:
            gm = self.rewritten(groups, kind, headless).graph_module
            self._graphs[key] = torch.compile(gm, dynamic=True) if self.backend == "inductor" else gm
        return self._graphs[key]

    def check_batch(self, batch) -> None:
        """A batch must hold the tensors the graph takes, as it was compiled for (dtype, rank, at least one
        example), and nothing the model would silently not see; the parameters must keep their dtypes."""
        missing = [k for k in self.captured.input_keys if k not in batch]
        unknown = [k for k, v in batch.items()
                   if k not in self.captured.input_keys and k not in self.loss_keys and isinstance(v, torch.Tensor)]
        if missing or unknown:
            raise ValueError(
                f"this batch does not match the compiled graph: missing {missing}, not taken by the graph {unknown}. "
                f"The graph takes {self.captured.input_keys}; loss-only keys: {list(self.loss_keys)}. Recompile "
                "with an example batch that has the same keys (declare loss-only keys with loss_keys=[...])."
            )
        for key, (dtype, dims) in self._input_specs.items():
            value = batch[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"batch key {key!r} holds a {type(value).__name__}, not a tensor")
            if value.dtype != dtype or value.dim() != dims:
                raise ValueError(
                    f"batch key {key!r} is {value.dtype} with {value.dim()} dims; the graph was compiled for "
                    f"{dtype} with {dims} dims. Convert the input, or compile with such a batch"
                )
            if value.dim() and value.shape[0] == 0:
                raise ValueError(f"batch key {key!r} holds no example (batch size 0)")
        for name, dtype in self._param_dtypes.items():
            if self.captured.params[name].dtype != dtype:
                raise ValueError(f"parameter {name} is {self.captured.params[name].dtype} but was {dtype} when the "
                                 "model was compiled; compile the model again after changing its dtype")

    def _run(self, batch: dict, table: GroupTable, headless: bool = False):
        seeds, scales = table.tensors()
        args = live_inputs(self.captured, self.model, batch) + [seeds, scales]
        with torch.no_grad():
            out = self._graph(table.groups, table.kind, headless)(*args)
        if not headless and self.captured.outputs is not None:
            return self.captured.outputs.rebuild(out)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    def forward_groups(self, batch: dict, table: GroupTable):
        """The model's outputs for every group: G slices of the batch dim, group-major."""
        self.check_batch(batch)
        return self._run(batch, table)

    def group_losses(self, batch: dict, table: GroupTable) -> torch.Tensor:
        """Per-example loss of every group, shape [G, B], from one batched pass."""
        self.check_batch(batch)
        batch_size = batch[self.captured.input_keys[0]].shape[0]
        if self.head is not None:
            losses = self._head_losses(batch, table, batch_size)
        else:
            outputs = self._run(batch, table)
            with torch.no_grad():
                losses = self.loss_fn(outputs, repeat_batch(batch, table.groups, batch_size))
            check_per_example(losses, table.groups, batch_size)
        return losses.view(table.groups, batch_size)

    def _head_losses(self, batch: dict, table: GroupTable, batch_size: int) -> torch.Tensor:
        """Run the graph up to the head, then the head and the loss a few groups at a time.

        As many groups share one head call as keep their logits within :func:`zo_fx.ops.head_logits_budget`
        (one group at a time for a large vocabulary over many rows, every group at once for a few
        rows): the head's weight is read once per call, and the logits never outgrow it.
        """
        hidden = self._run(batch, table, headless=True)
        head = self.head
        params = self.captured.params
        weight, bias = params[head.weight], params[head.bias] if head.bias else None
        w_pid, b_pid = self.pids.get(head.weight), self.pids.get(head.bias) if head.bias else None
        readout = hasattr(self.loss_fn, "from_readout") and hidden.dim() == 3
        if readout:
            positions = self.loss_fn.readout_positions(batch)
            token_ids = torch.tensor(self.loss_fn.readout_token_ids, device=hidden.device)
            rows = torch.arange(batch_size, device=hidden.device)
        out = []
        with torch.no_grad():
            if readout:
                for g, h in enumerate(hidden.chunk(table.groups, dim=0)):
                    logits = head_readout(h[rows, positions], weight, bias, w_pid, b_pid, table.seeds[g],
                                          table.scales[g], table.kind, head.layout, token_ids)
                    out.append(self.loss_fn.from_readout(logits, batch))
                return torch.cat(out)
            for g0, g1, logits in head_calls(hidden, weight, bias, w_pid, b_pid, table, head.layout):
                if head.out_dtype is not None:
                    logits = logits.to(head.out_dtype)
                outputs = self.captured.outputs.rebuild((logits,)) if self.captured.outputs else logits
                chunk_batch = batch if g1 - g0 == 1 else repeat_batch(batch, g1 - g0, batch_size)
                losses = self.loss_fn(outputs, chunk_batch)
                check_per_example(losses, g1 - g0, batch_size)
                out.append(losses.reshape(-1))
                del logits, outputs
        return torch.cat(out)

    def outputs(self, batch: dict) -> torch.Tensor:
        """Outputs of the unperturbed model (one group with coefficient 0)."""
        return self.forward_groups(batch, GroupTable([0], [0.0], 0.0))

    # ---- decoding ----------------------------------------------------------------------------------
    def decoder(self):
        """The decoding graph (captured on first use): see :mod:`zo_fx.decoding`."""
        if self._decoder is None:
            from .decoding import Decoder

            self._decoder = Decoder(self)
        return self._decoder

    def generate(self, batch: dict, table: GroupTable, max_new_tokens: int, **generation_args) -> torch.Tensor:
        """Decode the G perturbed models of ``table`` on the prompts of ``batch`` at once -> ``[G, B, ...]``
        token ids; group g sees ``theta + eps * c_g * u(seed_g)`` at every step. Arguments as Hugging Face
        ``generate`` (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_new_tokens``,
        ``eos_token_id``, ``pad_token_id``) plus ``generator=`` or ``seed=`` for sampling. See
        :func:`zo_fx.decoding.generate`."""
        from .decoding import generate

        return generate(self, batch, table, max_new_tokens, **generation_args)

    def report(self, groups: int = 2, kind: str = "rademacher") -> ZOReport:
        """Which rule handles each use of each trainable parameter, and what runs once vs G times."""
        report = build_report(self.captured, self.rewritten(groups, kind), self.model)
        report.notes.append(describe_outputs(self.captured.outputs))
        if self.captured.undone:
            report.notes.append("capture undid what the traced forward wrote on the model: "
                                + ", ".join(self.captured.undone))
        if self.head is not None:
            how = "label-word rows at one position" if hasattr(self.loss_fn, "from_readout") else "all rows"
            report.notes.append(f"output head {self.head.weight} fused into the loss, a few groups per call ({how})")
        if self._decoder is not None:
            report.notes.append(self._decoder.describe())
        return report

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters().values())
        return f"ZOModule({self.captured.model_class}, trainable={n:,} in {len(self.pids)} tensors, impl={self.impl})"


def zo_compile(
    model: torch.nn.Module,
    example_batch: dict,
    loss: LossFn | None = None,
    impl: str = "auto",
    *,
    backend: str = "eager",
    fuse_head: bool = True,
    loss_keys=(),
    outputs: str | None = None,
    settle: bool | None = None,
) -> ZOModule:
    """Capture ``model`` and prepare it for zeroth-order training.

    Args:
        model: a plain ``nn.Module``, a Hugging Face model, or a PEFT-wrapped one. It is
            captured in eval mode (no dropout: a perturbed loss difference must come from the
            perturbation alone) and left as it was found: attributes, buffers, hooks and
            training flag (see :mod:`zo_fx.passes.snapshot`). Parameters with
            ``requires_grad=False`` stay frozen.
        example_batch: a dict of tensors as the model's forward takes them.
        loss: ``loss(outputs, batch) -> Tensor[N]`` per example; default from the model class.
        impl: "auto" (Triton kernels for CUDA tensors, torch elsewhere), "torch" or "triton".
        backend: "eager" runs the rewritten FX graph as is; "inductor" hands it to torch.compile.
        loss_keys: batch keys only the loss reads (beside ``labels`` and the keys a loss
            declares in its ``loss_keys`` attribute). Every other tensor of the batch must
            be an input of the model's forward, or zo_compile raises naming the key.
        fuse_head: compute the output head and the loss one group at a time (see
            :mod:`zo_fx.passes.readout`), so only one group's logits exist at once.
        outputs: what the loss receives. ``"logits"``: the logits tensor (the fast path, with
            the fused head); ``"all"``: the model's own output object (``ModelOutput``, tuple,
            dict) with every per-example tensor of it, G groups' rows group-major; ``"auto"``:
            the logits when the output has them, else everything (span QA's start/end logits).
            Default: the loss's ``outputs`` attribute if it has one, else ``"auto"``.
        settle: a model whose first eval forward changes its own weights or buffers (RWKV
            rescales its layers) cannot be captured as a pure function before that. ``None``
            (default): when capture finds such a mutation, run one eager forward on the
            example batch under no_grad, warn what it changed, and capture again; ``True``:
            run that forward first; ``False``: refuse instead.
    """
    check_impl(impl)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if not isinstance(example_batch, Mapping):
        raise TypeError(
            "example_batch must be a dict of tensors (e.g. input_ids, attention_mask); "
            f"got {type(example_batch).__name__}"
        )
    example_batch = dict(example_batch)  # a tokenizer's BatchEncoding is a mapping, not a dict
    loss_fn = loss if loss is not None else default_loss(model)
    loss_only = (*DEFAULT_LOSS_KEYS, *getattr(loss_fn, "loss_keys", ()), *loss_keys)
    mode = check_output_mode(outputs if outputs is not None else getattr(loss_fn, "outputs", "auto"))
    if settle:
        settle_forward(model, example_batch, loss_only)
    try:
        captured = capture(model, example_batch, loss_keys=loss_only, outputs=mode)
    except ExportFailedError as err:
        if err.cause != "state mutation" or settle is not None:
            raise
        settle_forward(model, example_batch, loss_only)
        try:
            captured = capture(model, example_batch, loss_keys=loss_only, outputs=mode)
        except ExportFailedError as again:
            raise ExportFailedError(f"even after one settling eager forward: {again}", again.cause) from again
    if not captured.pids:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter used by its forward (all requires_grad=False?); "
            "unfreeze the parameters to train"
        )
    return ZOModule(model, captured, loss_fn, impl, backend, fuse_head, loss_only)


def settle_forward(model: torch.nn.Module, example_batch: dict, loss_keys) -> list[str]:
    """Run one eager eval-mode forward under no_grad and warn which parameters and buffers it changed.

    For models whose first eval forward rewrites their own state (a layer rescaling, a table
    built on first use): what it leaves is what every later eval forward of the model sees,
    so the graph is captured after it. The model's training flag is put back.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    versions = {name: t._version for name, t in tensors.items()}
    keys = model_input_keys(model, example_batch, loss_keys)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**{k: example_batch[k] for k in keys})
    finally:
        model.train(was_training)
    changed = [name for name, t in tensors.items() if t._version != versions[name]]
    warnings.warn(
        f"zo_compile ran one eager forward of {type(model).__name__} before capturing it: its forward changes its "
        f"own state on first use, and changed {len(changed)} tensor(s) in place "
        f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}). Pass settle=False to refuse instead.",
        stacklevel=3,
    )
    return changed
