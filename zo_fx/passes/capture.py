"""Graph capture: a model's forward as an ATen-level FX graph with parameters as inputs.

We use ``torch.export`` (non-strict) because it gives exactly what the rewrite needs:
every parameter and buffer lifted to a placeholder (so a use of a parameter is an
edge in the graph), ATen ops with shapes in ``node.meta['val']``, and symbolic batch
and sequence sizes so one graph serves any batch size. Hugging Face specifics handled
here: keyword-only forwards (PEFT), ``use_cache=False`` (no KV cache in the graph),
``ModelOutput`` results reduced to their ``logits`` or flattened whole
(:mod:`zo_fx.passes.outputs`), tied parameters (two names, one tensor) merged into one
parameter under the name ``named_parameters()`` yields. The trace runs in eval mode and
leaves the model as it found it (:mod:`zo_fx.passes.snapshot`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from ..losses import logits_of
from ..streams.ids import assign_param_ids
from .outputs import OutputStructure, flatten_output
from .snapshot import untouched


class ExportFailedError(RuntimeError):
    """torch.export could not capture the model; ``cause`` names the kind of obstacle."""

    def __init__(self, message: str, cause: str = "export"):
        super().__init__(message)
        self.cause = cause


@dataclass
class CapturedModel:
    """What the rewrite and the runtime need to know about a captured forward."""

    graph_module: torch.fx.GraphModule
    #: placeholder name -> ("parameter" | "buffer" | "constant" | "input", key)
    inputs: list[tuple[str, str, str]]
    #: placeholder name -> canonical parameter name (tied names collapse to one)
    param_of_placeholder: dict[str, str]
    #: canonical name -> the live nn.Parameter
    params: dict[str, torch.nn.Parameter]
    #: canonical trainable parameter name -> stable 32-bit stream id
    pids: dict[str, int]
    #: batch keys the model's forward receives, in placeholder order
    input_keys: list[str]
    #: sympy symbols of the batch dimension (one per input tensor)
    batch_symbols: set = field(default_factory=set)
    constants: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""
    #: how the graph's outputs rebuild the model's output object (None: one tensor, given as is)
    outputs: OutputStructure | None = None
    #: what the trace had written on the model's modules (undone; for the report)
    undone: list[str] = field(default_factory=list)

    def placeholders(self) -> dict[str, torch.fx.Node]:
        """The graph's placeholder nodes by name (their ``meta['val']`` is what each input was traced as)."""
        return {n.name: n for n in self.graph_module.graph.nodes if n.op == "placeholder"}


class _Forward(torch.nn.Module):
    """Calls the user's model with keyword arguments and returns a plain tensor output."""

    def __init__(self, model: torch.nn.Module, keys: list[str], extra_kwargs: dict, call=None,
                 outputs: str = "auto"):
        super().__init__()
        self.model = model
        self.keys = keys
        self.extra_kwargs = extra_kwargs
        self.call = call
        self.outputs = outputs
        # what the trace saw of the output's structure; export puts the attributes of the module it traces
        # back afterwards (containers' contents included), so the record lives outside any module
        record: list[OutputStructure | None] = [None]
        self.set_structure = lambda structure: record.__setitem__(0, structure)
        self.structure = lambda: record[0]

    def forward(self, *tensors):
        if self.call is not None:
            return tuple(self.call(self.model, dict(zip(self.keys, tensors))))
        out = self.model(**dict(zip(self.keys, tensors)), **self.extra_kwargs)
        flat, structure = flatten_output(out, self.outputs)
        self.set_structure(structure)
        return flat if structure is not None else flat[0]


def model_output_tensor(out):
    """The tensor a loss reads from a model's output: ``logits`` for Hugging Face outputs
    (:func:`zo_fx.losses.logits_of`), or an error saying what zo_compile needs."""
    try:
        return logits_of(out)
    except TypeError:
        raise TypeError(
            f"zo_compile needs the model to return a tensor or an output with .logits; got {type(out).__name__}. "
            "Wrap the model in a module whose forward returns the tensor your loss reads."
        ) from None


#: forward arguments that are switches or caches, never batch tensors
NOT_BATCH_ARGUMENTS = {"self", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
                       "past_key_values", "cache_position", "logits_to_keep", "num_logits_to_keep", "labels",
                       "return_loss", "interpolate_pos_encoding"}
#: batch keys a loss reads and no model takes
DEFAULT_LOSS_KEYS = ("labels",)


def _takes(fn) -> tuple[set[str], bool]:
    """Named keyword arguments of ``fn`` and whether it also takes ``**kwargs``."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def _inner_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model a wrapper whose forward takes ``**kwargs`` passes them on to (PEFT's base model)."""
    if hasattr(model, "get_base_model"):
        inner = model.get_base_model()
        if inner is not model:
            return inner
    for attr in ("base_model", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            return inner
    return None


def accepted_inputs(model: torch.nn.Module) -> set[str] | None:
    """Batch keys the model's forward takes (None: any key).

    A forward that takes ``**kwargs`` and wraps another model (PEFT) passes them on: the
    inner model's named arguments count too. A Hugging Face model's own ``**kwargs`` are
    switches (attention flags), not inputs; a plain module's ``**kwargs`` take any key.
    """
    names: set[str] = set()
    seen = set()
    current = model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        named, var_kw = _takes(current.forward)
        names |= named
        if not var_kw:
            return names - NOT_BATCH_ARGUMENTS
        inner = _inner_model(current)
        if inner is None:
            return (names - NOT_BATCH_ARGUMENTS) if is_hf_model(current) else None
        current = inner
    return names - NOT_BATCH_ARGUMENTS


def _takes_use_cache(model: torch.nn.Module) -> bool:
    named, var_kw = _takes(model.forward)
    return "use_cache" in named or var_kw


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict")


def model_input_keys(model: torch.nn.Module, batch: dict, loss_keys=DEFAULT_LOSS_KEYS) -> list[str]:
    """Batch keys that go to the model: every tensor of the batch but the loss's own keys.

    ``labels`` (and any other key in ``loss_keys``) stay out because a model's own loss
    averages over the whole batch and would mix the groups; zo_fx computes losses per
    group from the outputs. Any other key the forward does not take is an error: a batch
    tensor silently left out would change what the model computes.
    """
    accepted = accepted_inputs(model)
    keys, unknown = [], []
    for k, v in batch.items():
        if k in loss_keys:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"batch key {k!r} holds a {type(v).__name__}, not a tensor; pass only tensors, or declare the key "
                "loss-only with zo_compile(..., loss_keys=[...]) if only the loss reads it"
            )
        if accepted is None or k in accepted:
            keys.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(
            f"batch keys {unknown} are not inputs of {type(model).__name__}.forward (it takes "
            f"{sorted(accepted)}). Remove them from the batch, or declare them loss-only with "
            f"zo_compile(..., loss_keys=[...]) if only your loss reads them."
        )
    if not keys:
        raise ValueError(
            f"none of the batch keys {sorted(batch)} is an input of {type(model).__name__}.forward; "
            "pass the tensors the model takes (e.g. input_ids, attention_mask)"
        )
    return keys


def _export_example(batch: dict, keys: list[str]) -> dict:
    """An example batch whose batch size export can keep symbolic.

    export specialises sizes 0 and 1 and merges dims of equal size, so the example gets
    a batch size of at least 2 that differs from every other dim.
    """
    sizes = {int(s) for k in keys for s in batch[k].shape[1:]}
    b = batch[keys[0]].shape[0]
    target = max(b, 2)
    while target in sizes:
        target += 1
    if target == b:
        return {k: batch[k] for k in keys}
    idx = torch.arange(target) % b
    return {k: batch[k][idx.to(batch[k].device)] for k in keys}


def capture(model: torch.nn.Module, example_batch: dict, *, extra_kwargs: dict | None = None,
            loss_keys=DEFAULT_LOSS_KEYS, call=None, dynamic_dims: dict | None = None,
            outputs: str = "auto") -> CapturedModel:
    """Export ``model``'s forward on ``example_batch`` with dynamic batch (and sequence) dims.

    The graph is made functional (no in-place op: an in-place write on a value the groups
    share would leak one group's values into the others) and every batch key it received
    must reach an op of the graph.

    ``call(model, tensors) -> tuple of tensors`` replaces the plain forward call (decoding
    captures a forward that takes and returns a KV cache as tensors); ``dynamic_dims`` (key ->
    dims) names the symbolic dims of an input where they are not dims 0 and 1. ``outputs``:
    what the graph returns (:data:`zo_fx.passes.outputs.OUTPUT_MODES`).

    The trace runs in eval mode; afterwards every module is put back as it was (attributes,
    containers, hooks, training flag), whatever the model's forward wrote on itself.
    """
    keys = list(example_batch) if call is not None else model_input_keys(model, example_batch, loss_keys)
    extra = dict(extra_kwargs or {})
    if is_hf_model(model) and _takes_use_cache(model):
        extra.setdefault("use_cache", False)
    wrapper = _Forward(model, keys, extra, call, outputs)
    example = _export_example(example_batch, keys)
    dynamic_dims = dynamic_dims or {}
    dynamic = tuple(
        {d: Dim.AUTO for d in dynamic_dims[k]} if k in dynamic_dims else
        {d: Dim.AUTO for d in range(min(example[k].dim(), 2)) if d == 0 or example[k].shape[d] > 1} for k in keys
    )
    args = tuple(example[k] for k in keys)
    with untouched(model) as state:
        try:
            try:
                with torch.no_grad():
                    ep = torch.export.export(wrapper, args, dynamic_shapes=(dynamic,), strict=False)
            except TypeError as err:
                # a forward that takes **kwargs and already passes use_cache=False on itself (T5Gemma's heads):
                # the switch was ours to add only where the model leaves it to the caller
                if "use_cache" not in extra or "multiple values for keyword argument 'use_cache'" not in str(err):
                    raise
                del wrapper.extra_kwargs["use_cache"]
                with torch.no_grad():
                    ep = torch.export.export(wrapper, args, dynamic_shapes=(dynamic,), strict=False)
        except Exception as err:  # torch.export raises many types; all end here with advice
            raise export_failure(model, err) from err
    if any(_mutates(n) for n in ep.graph.nodes):
        ep = ep.run_decompositions({})  # functionalise: in-place ops become out-of-place ones
    captured = _collect(ep, model, keys, wrapper.structure())
    captured.undone = state.changes
    _check_inputs_used(captured)
    return captured


#: (cause, substrings of the exception's text or type name, advice) in the order they are tried
_FAILURES = (
    ("data-dependent control flow", ("data-dependent", "data dependent", "GuardOnDataDependent",
                                     "Could not guard on", "Could not extract specialized integer"),
     "the model branches in Python on a tensor's value (an `if` on a tensor, `.item()`, `.tolist()`, a loop "
     "whose length is a tensor). Rewrite that branch with tensor ops (torch.where, masks), fix the value "
     "before the forward (pass it as a Python number in the model's config), or freeze and exclude the "
     "module that does it"),
    ("unsupported output", ("zo_fx needs the tensors", "needs the model to return"),
     "compile with outputs='all' to give the loss the model's whole output, or wrap the model in a module "
     "whose forward returns the tensors the loss reads"),
    ("an input the trace cannot take", ("got an unexpected keyword argument", "missing 1 required",
                                        "missing a required"),
     "pass exactly the keyword tensors the model's forward takes (check the batch's keys against "
     "forward's signature)"),
)
_GENERIC_ADVICE = (
    "call model.eval() and pass only tensor inputs; disable caches (use_cache=False); for Hugging Face models try "
    "attn_implementation='sdpa' or 'eager'; replace data-dependent Python control flow on tensor values; or wrap "
    "the model in a small nn.Module whose forward takes tensors and returns what the loss reads."
)


def export_failure(model: torch.nn.Module, err: Exception) -> ExportFailedError:
    """An :class:`ExportFailedError` for ``err`` that names the kind of obstacle and what to try."""
    text = f"{type(err).__name__}: {err}"
    for cause, markers, advice in _FAILURES:
        if any(m in text for m in markers):
            return ExportFailedError(
                f"torch.export could not capture {type(model).__name__} ({cause}): {text}\nWhat to try: {advice}.",
                cause,
            )
    return ExportFailedError(
        f"torch.export could not capture {type(model).__name__}: {text}\nWhat to try: {_GENERIC_ADVICE}"
    )


def _mutates(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _check_inputs_used(captured: CapturedModel) -> None:
    graph = captured.graph_module.graph
    placeholders = captured.placeholders()
    for ph, kind, key in captured.inputs:
        if kind == "input" and not placeholders[ph].users:
            raise ValueError(
                f"batch key {key!r} reaches no op of {captured.model_class}'s captured forward: the model ignores "
                "it. Remove it from the batch, or declare it loss-only with zo_compile(..., loss_keys=[...])."
            )
    leftover = [n.name for n in graph.nodes if _mutates(n)]
    if leftover:
        raise ExportFailedError(f"the captured graph still writes in place after functionalisation: {leftover}")


def _batch_first(node, batch_symbols) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    size = val.shape[0]
    return isinstance(size, torch.SymInt) and size.node.expr in batch_symbols


def _drop_unbatched_outputs(gm: torch.fx.GraphModule, structure: OutputStructure,
                            batch_symbols: set) -> OutputStructure:
    """Leave out the outputs whose first dimension is not the batch (see :mod:`zo_fx.passes.outputs`)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(output.args[0])
    gone = {i for i, node in enumerate(outs) if not _batch_first(node, batch_symbols)}
    if not gone:
        return structure
    if len(gone) == len(outs):
        raise ExportFailedError(
            f"none of the model's outputs ({', '.join(structure.names[k] for k in structure.kept)}) has the batch "
            "as its first dimension, so no per-example loss can be read from them. Return per-example tensors.",
            "unsupported output",
        )
    output.args = (tuple(node for i, node in enumerate(outs) if i not in gone),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return structure.without(gone)


def _collect(ep, model: torch.nn.Module, keys: list[str], structure: OutputStructure | None = None) -> CapturedModel:
    gm = ep.graph_module
    sig = ep.graph_signature
    prefix = "model."
    named_params = dict(model.named_parameters(remove_duplicate=False))
    canonical_by_tensor: dict[int, str] = {}
    for name, p in model.named_parameters():  # remove_duplicate=True: first name of a tied tensor
        canonical_by_tensor[id(p)] = name

    inputs: list[tuple[str, str, str]] = []
    param_of_placeholder: dict[str, str] = {}
    params: dict[str, torch.nn.Parameter] = {}
    user_i = 0
    for spec in sig.input_specs:
        ph = spec.arg.name
        kind = spec.kind.name
        if kind == "PARAMETER":
            fqn = spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target
            tensor = named_params[fqn]
            canonical = canonical_by_tensor[id(tensor)]
            param_of_placeholder[ph] = canonical
            params[canonical] = tensor
            inputs.append((ph, "parameter", canonical))
        elif kind == "BUFFER":
            fqn = spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target
            inputs.append((ph, "buffer", fqn))
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            inputs.append((ph, "constant", spec.target))
        elif kind == "USER_INPUT":
            inputs.append((ph, "input", keys[user_i]))
            user_i += 1
        else:
            raise ExportFailedError(f"unexpected graph input kind {kind} for {ph}")
    for out_spec in sig.output_specs:
        if out_spec.kind.name not in ("USER_OUTPUT",):
            raise ExportFailedError(
                f"the captured forward of {type(model).__name__} mutates state ({out_spec.kind.name} "
                f"{out_spec.target}); zo_fx needs a pure forward. What to try: run the model in eval mode "
                "without caches; a model that settles its own weights or buffers on its first forward (a "
                "rescaling, a lazily built table) is captured after one eager forward under torch.no_grad() on "
                "an example batch, which zo_compile runs itself with settle=True.",
                "state mutation",
            )

    batch_symbols = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in {ph for ph, kind, _ in inputs if kind == "input"}:
            val = node.meta.get("val")
            if val is not None and val.dim() > 0:
                size = val.shape[0]
                if isinstance(size, int):
                    raise ExportFailedError(
                        f"torch.export specialised the batch dimension of input {node.name} of "
                        f"{type(model).__name__} to {size}: the model's code depends on the batch size. "
                        "zo_fx needs a dynamic batch dimension."
                    )
                batch_symbols |= size.node.expr.free_symbols

    if structure is not None:
        structure = _drop_unbatched_outputs(gm, structure, batch_symbols)
    trainable = [n for n, p in params.items() if p.requires_grad]
    return CapturedModel(
        graph_module=gm,
        inputs=inputs,
        param_of_placeholder=param_of_placeholder,
        params=params,
        pids=assign_param_ids(trainable),
        input_keys=keys,
        batch_symbols=batch_symbols,
        constants=dict(ep.constants),
        model_class=type(model).__name__,
        outputs=structure,
    )


def live_inputs(captured: CapturedModel, model: torch.nn.Module, batch: dict) -> list:
    """The graph's positional inputs for ``batch``, reading parameters and buffers live."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    out = []
    for ph, kind, key in captured.inputs:
        if kind == "parameter":
            out.append(captured.params[key])
        elif kind == "buffer":
            out.append(buffers[key])
        elif kind == "constant":
            out.append(captured.constants[key])
        else:
            out.append(batch[key])
    return out
